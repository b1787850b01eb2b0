from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, Field


class EventRead(BaseModel):
    """One event of the stream; `id` is its position (send it back as Last-Event-ID)."""

    id: int
    type: str = Field(
        description="task.created, task.sent, task.in_progress, task.progress, task.<final state>, "
        "task.queued (re-queued), device.online, device.offline, process.started, process.completed, "
        "process.failed, process.canceled, step.opened, step.completed, step.passed, step.arrived, notify.queued "
        "(process events: `details` has instance_id, step and details)"
    )
    device_id: str | None = Field(description="None for a process instance without a device.")
    task_id: UUID | None = None
    version: int | None = None
    attempt: int | None = None
    details: dict[str, Any] | None = None
    created_at: datetime
