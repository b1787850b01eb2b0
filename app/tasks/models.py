from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, String, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, Timestamped
from swarm_device.protocol import TaskStatus

_STATUS_VALUES = ", ".join(f"'{s.value}'" for s in TaskStatus)


class Task(Timestamped, Base):
    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(f"status IN ({_STATUS_VALUES})", name="status"),
        CheckConstraint("attempt >= 0 AND attempt <= max_attempts", name="attempt"),
        # The pull: a device's pending tasks by priority, then age.
        Index(
            "ix_tasks_pending",
            "device_id",
            text("priority DESC"),
            "created_at",
            postgresql_where=text("status IN ('queued', 'sent')"),
        ),
        # At most one task in progress per device, whatever races between consumers.
        Index(
            "uq_tasks_device_in_progress",
            "device_id",
            unique=True,
            postgresql_where=text("status = 'in_progress'"),
        ),
        Index("ix_tasks_deadline", "deadline_at", postgresql_where=text("status = 'in_progress'")),
        Index(
            "ix_tasks_expiry",
            "expires_at",
            postgresql_where=text("status IN ('queued', 'sent') AND expires_at IS NOT NULL"),
        ),
        Index("ix_tasks_notice_due", "notice_due_at", postgresql_where=text("notice_due_at IS NOT NULL")),
        # Listings newest first: all tasks, a device's tasks, tasks in a status.
        Index("ix_tasks_created", "created_at", "id"),
        Index("ix_tasks_device_created", "device_id", "created_at", "id"),
        Index("ix_tasks_status_created", "status", "created_at", "id"),
        Index("ix_tasks_batch", "batch_id", postgresql_where=text("batch_id IS NOT NULL")),
        Index(
            "uq_tasks_idempotency",
            "device_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    # The device and the batch must exist: checked once per INSERT statement by a trigger, not by
    # a foreign key per row (the baseline migration, decision 23).
    device_id: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(128))
    params: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(16), server_default=TaskStatus.QUEUED.value)
    priority: Mapped[int] = mapped_column(server_default=text("0"))
    attempt: Mapped[int] = mapped_column(server_default=text("0"))
    max_attempts: Mapped[int]
    timeout_s: Mapped[int]
    # Set by the trigger `tasks_lifecycle` on every change the audit records.
    version: Mapped[int] = mapped_column(server_default=text("1"))
    expires_at: Mapped[datetime | None]
    deadline_at: Mapped[datetime | None]
    sent_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    status_details: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # Outbox: set while a notice for this task still has to be confirmed by the broker.
    notice_due_at: Mapped[datetime | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    batch_id: Mapped[uuid.UUID | None]


class TaskBatch(Base):
    """One `POST /tasks/batch`: its tasks carry its id; the key and hash make retries safe."""

    __tablename__ = "task_batches"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    task_count: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))


class TaskEvent(Base):
    """The audit history: one row per change of a task, written by triggers (the baseline migration)."""

    __tablename__ = "task_events"
    __table_args__ = (Index("uq_task_events_task_version", "task_id", "version", unique=True),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    version: Mapped[int]
    status: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int]
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
