"""The wire contract between the core and devices: topics and payloads.

Both sides import this module (the core and the device SDK); it imports neither. MQTT topics use
`/`; the core sees the same topics as AMQP routing keys on `amq.topic` with `.` instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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
    # The device sent more requests than its limit allows: wait `retry_after_s`, then send again.
    RATE_LIMITED = "rate_limited"


# What each error code tells the device to do (the AsyncAPI document lists them).
ERROR_MEANINGS: dict[ErrorCode, str] = {
    ErrorCode.INVALID: "The request is malformed (not JSON, no usable id, params failing validation): "
    "fix it, do not resend it unchanged.",
    ErrorCode.NOT_FOUND: "The task does not exist or is not this device's (also a task id that is not a UUID).",
    ErrorCode.CONFLICT: "The task's state does not allow it: progress or a result for a task that is "
    "not in progress (canceled, timed out, already finished with another report). Drop the task.",
    ErrorCode.INTERNAL: "The core failed to handle it (e.g. its database is down): resend later with the same id.",
    ErrorCode.RATE_LIMITED: "The device sent more requests than its limit allows: wait `retry_after_s` seconds, "
    "then resend with the same id.",
}


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
    # Only with `rate_limited`: how long to wait before sending again.
    retry_after_s: float | None = None


class Reply(WireModel):
    """Core -> device answer on `dev/{id}/down/rpc`: exactly one of `result` and `error` is set.

    `id` is the request's id; it is None only when the request was too broken to carry one.
    """

    id: str | None
    result: Any = None
    error: RpcError | None = None


class Params(WireModel):
    """The params of a device request: a field the method does not define is refused (`invalid`,
    naming it), not dropped, so that a misplaced field is not acknowledged as if it were stored."""

    model_config = ConfigDict(extra="forbid")


class NoParams(Params):
    """Params of a method that takes none (`tasks/next`): `{}`."""


class Acknowledged(WireModel):
    """The result of a method that returns nothing else (`state`)."""

    ok: bool = True


class HelloParams(Params):
    firmware: str = Field(default="", max_length=128)
    model: str = Field(default="", max_length=128)
    capabilities: list[str] = Field(default_factory=list, max_length=256)


class ProgressParams(Params):
    status_details: dict[str, Any] = Field(default_factory=dict)


class ResultParams(Params):
    status: ReportedStatus
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    next: bool = Field(
        default=False,
        description="Also hand out the device's next task: the reply then carries it as `next_task` "
        "(null: none), as `tasks/next` would, so the device need not call `tasks/next` after the result.",
    )


class StateParams(Params):
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
    desired_config: dict[str, Any] | None = Field(
        default=None,
        description="The desired configuration (the same as retained on `dev/{id}/down/config`), null if none.",
    )


@dataclass(frozen=True)
class Method:
    """A method a device calls on `dev/{id}/up/rpc/{name}`; `{task_id}` in a name is the task's id."""

    name: str
    params: type[Params]
    result: Any  # the type of the reply's `result`
    summary: str


METHODS: tuple[Method, ...] = (
    Method(
        METHOD_HELLO,
        HelloParams,
        Device,
        "Say who you are on every (re)connect: firmware, model, capabilities. Idempotent; resend with the "
        "same request id until answered.",
    ),
    Method(
        METHOD_TASKS_NEXT,
        NoParams,
        Task | None,
        "Pull the current task: the one in progress if any (also after a reboot: resume it, do not run it "
        "again), else the next queued one, which becomes in_progress; null when there is none. Call it on "
        "every (re)connect, on every task_queued notice and after every result (unless that result's reply "
        "carried `next_task`).",
    ),
    Method(
        progress_method("{task_id}"),
        ProgressParams,
        Task,
        "Progress of the task in progress; extends its deadline by its step timeout (timeout_s). Report "
        "within every step timeout, or the task is handed out again or times out.",
    ),
    Method(
        result_method("{task_id}"),
        ResultParams,
        FinishedTask,
        "The final report: succeeded, failed or rejected. A repeated identical report is answered again; "
        "another report of a finished task is a conflict. With `next: true` the reply also carries "
        "`next_task`, what tasks/next would answer now, so the device need not call it.",
    ),
    Method(METHOD_STATE, StateParams, Acknowledged, "The device's reported configuration/state; stored."),
)
