"""The wire contract between the core and devices: topics and payloads.

Both sides import this module (the core and the device SDK); it imports neither. MQTT topics use
`/`; the core sees the same topics as AMQP routing keys on `amq.topic` with `.` instead.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

DEVICE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)
REQUEST_ID_MAX_LENGTH = 64

# Methods a device calls: the part of the up-topic after `dev/{id}/up/rpc/`.
METHOD_HELLO = "hello"
METHOD_TASKS_NEXT = "tasks/next"
METHOD_STATE = "state"


def progress_method(task_id: UUID | str) -> str:
    return f"tasks/{task_id}/progress"


def result_method(task_id: UUID | str) -> str:
    return f"tasks/{task_id}/result"


def notify_topic(device_id: str) -> str:
    return f"dev/{device_id}/down/notify"


def reply_topic(device_id: str) -> str:
    return f"dev/{device_id}/down/rpc"


def config_topic(device_id: str) -> str:
    return f"dev/{device_id}/down/config"


def request_topic(device_id: str, method: str) -> str:
    return f"dev/{device_id}/up/rpc/{method}"


def down_topics(device_id: str) -> list[str]:
    """The exact topics a device subscribes to (no wildcards: retained messages need exact ones)."""
    return [notify_topic(device_id), reply_topic(device_id), config_topic(device_id)]


def to_routing_key(topic: str) -> str:
    """MQTT topic -> AMQP routing key (RabbitMQ swaps `/` and `.`)."""
    return topic.replace("/", ".")


class TaskStatus(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    TIMED_OUT = "timed_out"
    EXPIRED = "expired"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset(
    {
        TaskStatus.SUCCEEDED,
        TaskStatus.FAILED,
        TaskStatus.REJECTED,
        TaskStatus.TIMED_OUT,
        TaskStatus.EXPIRED,
        TaskStatus.CANCELED,
    }
)
PENDING_STATUSES = frozenset({TaskStatus.QUEUED, TaskStatus.SENT})
ReportedStatus = Literal["succeeded", "failed", "rejected"]


class ErrorCode(StrEnum):
    INVALID = "invalid"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    INTERNAL = "internal"


class WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Notice(WireModel):
    """Core -> device hint on `dev/{id}/down/notify`; the device then pulls with `tasks/next`."""

    event: Literal["task_queued", "task_canceled"]
    task_id: UUID


class Request(WireModel):
    """Device -> core request envelope on `dev/{id}/up/rpc/{method}`."""

    id: str = Field(min_length=1, max_length=REQUEST_ID_MAX_LENGTH)
    params: dict[str, Any] = Field(default_factory=dict)


class RpcError(WireModel):
    code: ErrorCode
    message: str


class Reply(WireModel):
    """Core -> device answer on `dev/{id}/down/rpc`: exactly one of `result` and `error` is set.

    `id` is the request's id; it is None only when the request was too broken to carry one.
    """

    id: str | None
    result: Any = None
    error: RpcError | None = None


class HelloParams(WireModel):
    firmware: str = Field(default="", max_length=128)
    model: str = Field(default="", max_length=128)
    capabilities: list[str] = Field(default_factory=list, max_length=256)


class ProgressParams(WireModel):
    status_details: dict[str, Any] = Field(default_factory=dict)


class ResultParams(WireModel):
    status: ReportedStatus
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    next: bool = Field(
        default=False,
        description="Also hand out the device's next task: the reply then carries it as `next_task` "
        "(null: none), as `tasks/next` would, so the device need not call `tasks/next` after the result.",
    )


class StateParams(WireModel):
    reported: dict[str, Any] = Field(default_factory=dict)


class Task(WireModel):
    """A task as shown to the device and to the control center."""

    id: UUID
    device_id: str
    method: str
    params: dict[str, Any]
    status: TaskStatus
    priority: int
    attempt: int
    max_attempts: int
    version: int
    created_at: datetime
    updated_at: datetime
    deadline_at: datetime | None = None
    expires_at: datetime | None = None
    status_details: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class FinishedTask(Task):
    """The answer to a `result` that asked for `next`: the final task and the device's next one,
    already in progress (null if there is none). A core that does not know `next` answers without
    `next_task`: the device then pulls with `tasks/next` as before."""

    next_task: Task | None = None


class Device(WireModel):
    """The device record answered to `hello`."""

    id: str
    firmware: str | None = None
    model: str | None = None
    capabilities: list[str] = Field(default_factory=list)
    online: bool = False
    last_seen_at: datetime | None = None
