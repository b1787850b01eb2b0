"""Request and response bodies of the processes API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from app.processes.definition import NAME_PATTERN, PG_INT_MAX, Definition
from swarm_device.protocol import DEVICE_ID_PATTERN, TaskStatus


class DefinitionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="A new name starts at version 1; a known one gets the next.")
    definition: Definition


class DefinitionRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    name: str
    version: int
    definition: Definition
    created_by: str
    created_at: datetime


class InstanceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    definition: str = Field(pattern=NAME_PATTERN)
    version: int | None = Field(default=None, ge=1, le=PG_INT_MAX, description="Default: the newest version.")
    device_id: str | None = Field(default=None, pattern=DEVICE_ID_PATTERN)
    input: dict[str, Any] = Field(default_factory=dict)


class StepRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    instance_id: UUID
    step: str
    kind: str
    status: str
    outcome: str | None
    role: str | None
    task_id: UUID | None
    child_id: UUID | None
    due_at: datetime | None
    actor: str | None
    output: dict[str, Any] | None
    created_at: datetime
    finished_at: datetime | None


class HistoryRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    type: str
    step: str | None
    details: dict[str, Any] | None
    created_at: datetime


class InstanceRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    name: str
    version: int
    device_id: str | None
    status: Literal["running", "completed", "failed", "canceled"]
    result: str | None
    data: dict[str, Any]
    parent_id: UUID | None
    created_at: datetime
    finished_at: datetime | None


class InstancePage(BaseModel):
    items: list[InstanceRead]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null at the end.")


class InstanceDetail(InstanceRead):
    steps: list[StepRead] = Field(description="Every waiting step, open and ended, oldest first.")
    history: list[HistoryRead] = Field(description="What happened, oldest first (also in GET /events).")


class StepComplete(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outcome: str = Field(min_length=1, max_length=64)
    output: dict[str, Any] = Field(default_factory=dict, description="Kept in the instance data as steps.<id>.")


class TriggerCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    definition: str = Field(pattern=NAME_PATTERN)
    event: Literal["task_final", "device_offline", "state_match"]
    method: str | None = Field(default=None, max_length=128, description="task_final: only tasks of this method.")
    statuses: list[TaskStatus] | None = Field(default=None, description="task_final: only these final statuses.")
    condition: str | None = Field(
        default=None, max_length=2000, description="state_match: a CEL expression over `state` (required)."
    )
    input: dict[str, Any] = Field(default_factory=dict, description="The started instances' input.")


class TriggerRead(TriggerCreate):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    enabled: bool
    created_at: datetime
