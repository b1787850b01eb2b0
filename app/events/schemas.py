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
        "task.queued (re-queued), device.online, device.offline"
    )
    device_id: str
    task_id: UUID | None = None
    version: int | None = None
    attempt: int | None = None
    details: dict[str, Any] | None = None
    created_at: datetime
