from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from app.storable_json import StorableObject
from swarm_device.protocol import DEVICE_ID_PATTERN, Task, TaskStatus

# A task is shown the same way to the control center and to the device.
TaskRead = Task

METHOD_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
MAX_BATCH_DEVICES = 50_000


def _date_time_text(value: object) -> object:
    # pydantic also reads a number ("0") as a Unix time; the API documents RFC 3339 date-times.
    if isinstance(value, str) and not _DATE_TIME_START.match(value):
        raise ValueError("must be an RFC 3339 date-time, e.g. 2026-12-04T15:00:00Z")
    return value


_DATE_TIME_START = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]")
DateTimeQuery = Annotated[datetime, BeforeValidator(_date_time_text)]


class TaskCreate(BaseModel):
    # Strict: `"priority": "5"` or `5.0` is refused as the documented integer it is not.
    model_config = ConfigDict(extra="forbid", strict=True)

    method: str = Field(pattern=METHOD_PATTERN, description="What the device should do, e.g. `reboot`.")
    params: StorableObject = Field(default_factory=dict)
    priority: int = Field(default=0, ge=-1000, le=1000, description="Higher runs first.")
    ttl_s: int | None = Field(
        default=None, gt=0, le=30 * 86400, description="Expire if not handed out within this time."
    )
    timeout_s: int | None = Field(
        default=None, gt=0, le=7 * 86400, description="Time a device has per attempt (and per progress step)."
    )
    max_attempts: int | None = Field(default=None, ge=1, le=100)


class TaskBatchCreate(TaskCreate):
    device_ids: list[Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]] = Field(
        min_length=1, max_length=MAX_BATCH_DEVICES, description="One task (the same command) for each device."
    )

    @field_validator("device_ids")
    @classmethod
    def _distinct(cls, device_ids: list[str]) -> list[str]:
        if len(set(device_ids)) != len(device_ids):
            raise ValueError("device ids must be distinct")
        return device_ids


class TaskBatchRead(BaseModel):
    id: UUID
    task_count: int
    created_at: datetime
    tasks_url: str = Field(description="Where the batch's tasks are listed (cursor pagination).")


class TaskFilter(BaseModel):
    device_id: str | None = None
    batch_id: UUID | None = None
    status: list[TaskStatus] | None = None
    method: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


class TaskPage(BaseModel):
    items: list[TaskRead]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null at the end.")


class TaskEventRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    task_id: UUID
    version: int
    status: TaskStatus
    attempt: int
    details: dict[str, Any] | None
    created_at: datetime
