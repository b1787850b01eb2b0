from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from swarm_device.protocol import Task, TaskStatus

# A task is shown the same way to the control center and to the device.
TaskRead = Task

METHOD_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"


class TaskCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = Field(pattern=METHOD_PATTERN, description="What the device should do, e.g. `reboot`.")
    params: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(default=0, ge=-1000, le=1000, description="Higher runs first.")
    ttl_s: int | None = Field(
        default=None, gt=0, le=30 * 86400, description="Expire if not handed out within this time."
    )
    timeout_s: int | None = Field(
        default=None, gt=0, le=7 * 86400, description="Time a device has per attempt (and per progress step)."
    )
    max_attempts: int | None = Field(default=None, ge=1, le=100)


class TaskFilter(BaseModel):
    device_id: str | None = None
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
