"""Process definitions, instances, their steps, their history, the notification outbox and the
triggers. History rows take their ids from the task events' sequence: they appear in the one
event log (GET /api/v1/events)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Identity, Index, String, UniqueConstraint, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, Timestamped
from app.events.models import EVENT_ID_SEQUENCE

INSTANCE_STATUSES = ("running", "completed", "failed", "canceled")
STEP_STATUSES = ("open", "done", "canceled")
TRIGGER_EVENTS = ("task_final", "device_offline", "state_match")


def _values(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


class ProcessDefinition(Base):
    """One version of a definition; a new body under the same name is the next version."""

    __tablename__ = "process_definitions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_process_definitions_name_version"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int]
    body: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))


class ProcessInstance(Timestamped, Base):
    __tablename__ = "process_instances"
    __table_args__ = (
        CheckConstraint(f"status IN ({_values(INSTANCE_STATUSES)})", name="status"),
        Index("ix_process_instances_created", "created_at", "id"),
        Index("ix_process_instances_status_created", "status", "created_at", "id"),
        Index("ix_process_instances_device", "device_id", "created_at", postgresql_where=text("device_id IS NOT NULL")),
        Index("ix_process_instances_parent", "parent_id", postgresql_where=text("parent_id IS NOT NULL")),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    definition_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("process_definitions.id"))
    # The definition's name and version, kept for listing without a join.
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int]
    device_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), server_default="running")
    result: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSONB)
    parent_id: Mapped[uuid.UUID | None]
    parent_step_id: Mapped[int | None] = mapped_column(BigInteger)
    # A start with the same key starts nothing new (retried requests, a trigger firing again).
    start_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    finished_at: Mapped[datetime | None]


class ProcessStep(Base):
    """A step that waits (human, device task, timer, join, sub-process): open until it ends."""

    __tablename__ = "process_steps"
    __table_args__ = (
        CheckConstraint(f"status IN ({_values(STEP_STATUSES)})", name="status"),
        Index("ix_process_steps_instance", "instance_id", "id"),
        # The work list: open human steps by role, oldest first.
        Index("ix_process_steps_work", "role", "id", postgresql_where=text("status = 'open' AND role IS NOT NULL")),
        # Timers and deadlines: the jobs' scan.
        Index("ix_process_steps_due", "due_at", postgresql_where=text("status = 'open' AND due_at IS NOT NULL")),
        Index("ix_process_steps_task", "task_id", postgresql_where=text("status = 'open' AND task_id IS NOT NULL")),
        Index("ix_process_steps_child", "child_id", unique=True, postgresql_where=text("child_id IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    instance_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("process_instances.id", ondelete="CASCADE"))
    step: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), server_default="open")
    outcome: Mapped[str | None] = mapped_column(String(64))
    role: Mapped[str | None] = mapped_column(String(64))
    task_id: Mapped[uuid.UUID | None]
    child_id: Mapped[uuid.UUID | None]
    due_at: Mapped[datetime | None]
    arrivals: Mapped[int] = mapped_column(server_default=text("0"))
    actor: Mapped[str | None] = mapped_column(String(200))
    output: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    finished_at: Mapped[datetime | None]


class ProcessEvent(Base):
    """The history of an instance; each row is also an event of GET /api/v1/events."""

    __tablename__ = "process_events"
    __table_args__ = (
        Index("ix_process_events_instance", "instance_id", "id"),
        # What advanced an instance is recorded once: a second delivery of the same event fails here.
        Index(
            "uq_process_events_key",
            "instance_id",
            "event_key",
            unique=True,
            postgresql_where=text("event_key IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(
        BigInteger, primary_key=True, server_default=text(f"nextval('{EVENT_ID_SEQUENCE}')")
    )
    instance_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("process_instances.id", ondelete="CASCADE"))
    device_id: Mapped[str | None] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(32))
    step: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    event_key: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))


class ProcessOutbox(Base):
    """A notification to deliver; kept until delivered, retried with back-off while it fails."""

    __tablename__ = "process_outbox"
    __table_args__ = (Index("ix_process_outbox_due", "due_at", postgresql_where=text("sent_at IS NULL")),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    instance_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("process_instances.id", ondelete="CASCADE"))
    step: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16))
    recipients: Mapped[list[str]] = mapped_column(JSONB)
    url: Mapped[str | None] = mapped_column(String(2000))
    subject: Mapped[str] = mapped_column(String(500))
    body: Mapped[str]
    attempts: Mapped[int] = mapped_column(server_default=text("0"))
    due_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    sent_at: Mapped[datetime | None]
    last_error: Mapped[str | None]
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))


class ProcessTrigger(Base):
    """Starts an instance of `definition` for the device of each matching event."""

    __tablename__ = "process_triggers"
    __table_args__ = (CheckConstraint(f"event IN ({_values(TRIGGER_EVENTS)})", name="event"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    definition: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(16))
    # task_final: the task's method and final statuses to match (None: any).
    method: Mapped[str | None] = mapped_column(String(128))
    statuses: Mapped[list[str] | None] = mapped_column(JSONB)
    # state_match: a CEL expression over `state` (the device's reported state).
    condition: Mapped[str | None] = mapped_column(String(2000))
    input: Mapped[dict[str, Any]] = mapped_column(JSONB)
    enabled: Mapped[bool] = mapped_column(server_default=text("true"))
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))


class ProcessTriggerCursor(Base):
    """One row: how far the trigger job has read the event log and the devices' reported states."""

    __tablename__ = "process_trigger_cursor"

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[int] = mapped_column(BigInteger)
    state_seen_at: Mapped[datetime]
