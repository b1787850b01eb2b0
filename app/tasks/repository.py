"""SQL for tasks: plain async functions, SQL in, ORM objects out. Never commits."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    Boolean,
    ColumnElement,
    Select,
    String,
    Uuid,
    and_,
    any_,
    bindparam,
    case,
    column,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    table,
    text,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from app import metrics
from app.tasks.models import Task, TaskBatch, TaskEvent
from app.tasks.schemas import TaskFilter
from swarm_device.protocol import PENDING_STATUSES, TaskStatus

_PENDING = [s.value for s in PENDING_STATUSES]
_ONE_SECOND: ColumnElement[Any] = literal_column("interval '1 second'")


def _seconds(column: Any) -> ColumnElement[Any]:
    return column * _ONE_SECOND  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class NewTask:
    """A QUEUED task to insert, made from a validated request. Not an ORM object: intake writes
    many in one statement and answers from these values."""

    id: uuid.UUID
    device_id: str
    method: str
    params: dict[str, Any]
    params_json: str
    priority: int
    max_attempts: int
    timeout_s: int
    created_at: datetime
    expires_at: datetime | None
    idempotency_key: str | None
    request_hash: str | None


# One statement for any number of tasks: the arrays are columns. Only devices that exist and are
# not revoked get a row; an Idempotency-Key already used for the device leaves the row out.
# status, attempt and version take their defaults: queued, 0, 1.
_INSERT_TASKS = text(
    """
INSERT INTO tasks (id, device_id, method, params, priority, max_attempts, timeout_s,
                   created_at, updated_at, expires_at, notice_due_at, idempotency_key, request_hash)
SELECT r.id, r.device_id, r.method, r.params::jsonb, r.priority, r.max_attempts, r.timeout_s,
       r.created_at, r.created_at, r.expires_at, r.created_at, r.idempotency_key, r.request_hash
FROM unnest(CAST(:id AS uuid[]), CAST(:device_id AS text[]), CAST(:method AS text[]), CAST(:params AS text[]),
            CAST(:priority AS int[]), CAST(:max_attempts AS int[]), CAST(:timeout_s AS int[]),
            CAST(:created_at AS timestamptz[]), CAST(:expires_at AS timestamptz[]),
            CAST(:idempotency_key AS text[]), CAST(:request_hash AS text[]))
     AS r(id, device_id, method, params, priority, max_attempts, timeout_s, created_at, expires_at,
          idempotency_key, request_hash)
JOIN devices ON devices.id = r.device_id AND devices.revoked_at IS NULL
ON CONFLICT (device_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id
"""
)


async def insert_tasks(session: AsyncSession, tasks: Sequence[NewTask]) -> set[uuid.UUID]:
    """Insert the tasks in one statement; returns the ids of those inserted (the others name an
    unknown or revoked device, or reuse an Idempotency-Key)."""
    columns = {
        "id": [t.id for t in tasks],
        "device_id": [t.device_id for t in tasks],
        "method": [t.method for t in tasks],
        "params": [t.params_json for t in tasks],
        "priority": [t.priority for t in tasks],
        "max_attempts": [t.max_attempts for t in tasks],
        "timeout_s": [t.timeout_s for t in tasks],
        "created_at": [t.created_at for t in tasks],
        "expires_at": [t.expires_at for t in tasks],
        "idempotency_key": [t.idempotency_key for t in tasks],
        "request_hash": [t.request_hash for t in tasks],
    }
    return set((await session.execute(_INSERT_TASKS, columns)).scalars())


async def get_task(session: AsyncSession, task_id: uuid.UUID, *, lock: bool = False) -> Task | None:
    stmt = select(Task).where(Task.id == task_id)
    if lock:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_by_idempotency_key(session: AsyncSession, device_id: str, key: str) -> Task | None:
    stmt = select(Task).where(Task.device_id == device_id, Task.idempotency_key == key)
    return (await session.execute(stmt)).scalar_one_or_none()


async def in_progress_task(session: AsyncSession, device_id: str) -> Task | None:
    stmt = select(Task).where(Task.device_id == device_id, Task.status == TaskStatus.IN_PROGRESS)
    return (await session.execute(stmt)).scalar_one_or_none()


# The device's IN_PROGRESS task, else its next pending one handed out now. The claim sees the
# same snapshot as the lookup and runs only if that found nothing. It waits for a row lock and
# never skips one (decision 14): the notifier or a job holding the row for a moment must not
# make the device hear "nothing to do"; a row that changed meanwhile is re-checked and passed
# over. Built once: composing it per call cost more CPU than the database spends running it.
_CURRENT_OR_CLAIM = select(Task, column("claimed", Boolean)).from_statement(
    text(
        """
        WITH current AS (
            SELECT * FROM tasks WHERE device_id = :device_id AND status = :in_progress
        ), claimed AS (
            UPDATE tasks
            SET status = :in_progress, attempt = attempt + 1, version = version + 1, started_at = now(),
                deadline_at = now() + timeout_s * interval '1 second', status_details = NULL, updated_at = now()
            WHERE id = (
                SELECT id FROM tasks
                WHERE device_id = :device_id AND status = ANY(:pending)
                  AND (expires_at IS NULL OR expires_at > now())
                  AND NOT EXISTS (SELECT FROM current)
                ORDER BY priority DESC, created_at
                LIMIT 1
                FOR UPDATE
            )
            RETURNING *
        )
        SELECT *, false AS claimed FROM current
        UNION ALL
        SELECT *, true AS claimed FROM claimed
        """
    ).bindparams(
        bindparam("device_id", type_=String),
        bindparam("in_progress", TaskStatus.IN_PROGRESS.value, type_=String),
        bindparam("pending", _PENDING, type_=ARRAY(String)),
    )
)


async def current_or_claim(session: AsyncSession, device_id: str) -> Task | None:
    """The device's IN_PROGRESS task, else its next pending one handed out now, in ONE statement
    (one database round trip; committed on its own when the session autocommits).

    The claim sees the same snapshot as the in-progress lookup and runs only if that found none.
    A rival claim for the same device that commits first ends this one on the one-in-progress
    index (IntegrityError): the caller then reads the rival's task.
    """
    row = (await session.execute(_CURRENT_OR_CLAIM, {"device_id": device_id})).one_or_none()
    if row is None:
        return None
    task, claimed = row
    if claimed:
        metrics.CREATED_TO_IN_PROGRESS.observe(metrics.seconds_between(task.created_at, task.started_at))
    return task  # type: ignore[no-any-return]


# A report on a task that is in progress, the usual case, as one UPDATE; anything else (not in
# progress, another device's, a retried report) is explained by the caller's locked path.
_FINISH_IN_PROGRESS = (
    update(Task)
    .where(
        Task.id == bindparam("of_task"),
        Task.device_id == bindparam("of_device"),
        Task.status == TaskStatus.IN_PROGRESS,
    )
    .values(
        status=bindparam("new_status"),
        result=bindparam("new_result", type_=JSONB(none_as_null=True)),
        error=bindparam("new_error", type_=JSONB(none_as_null=True)),
        version=Task.version + 1,
        finished_at=func.now(),
        updated_at=func.now(),
        deadline_at=None,
        notice_due_at=None,
    )
    .returning(Task)
    .execution_options(synchronize_session=False)
)


async def finish_in_progress(
    session: AsyncSession,
    device_id: str,
    task_id: uuid.UUID,
    status: TaskStatus,
    result: dict[str, Any] | None,
    error: dict[str, Any] | None,
) -> Task | None:
    """Make the device's IN_PROGRESS task final; None if it is not in progress (or not its)."""
    # (An UPDATE's bind parameters may not be named like its columns.)
    params = {
        "of_task": task_id,
        "of_device": device_id,
        "new_status": status.value,
        "new_result": result,
        "new_error": error,
    }
    task = (await session.execute(_FINISH_IN_PROGRESS, params)).scalar_one_or_none()
    if task is not None:
        elapsed = metrics.seconds_between(task.created_at, task.finished_at)
        metrics.CREATED_TO_FINAL.labels(status.value).observe(elapsed)
    return task


def set_status(task: Task, status: TaskStatus, **changes: Any) -> None:
    """Apply a lifecycle change to a loaded (locked) task: every change bumps `version`."""
    now = datetime.now(UTC)
    task.status = status
    task.version += 1
    task.updated_at = now
    if status.is_final:
        task.finished_at = now
        task.deadline_at = None
        task.notice_due_at = None
        metrics.CREATED_TO_FINAL.labels(status.value).observe(metrics.seconds_between(task.created_at, now))
    for name, value in changes.items():
        setattr(task, name, value)


async def extend_deadline(session: AsyncSession, task: Task, status_details: dict[str, Any]) -> Task:
    stmt = (
        update(Task)
        .where(Task.id == task.id)
        .values(
            status_details=status_details,
            version=Task.version + 1,
            deadline_at=func.now() + _seconds(Task.timeout_s),
            updated_at=func.now(),
        )
        .returning(Task)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    return (await session.execute(stmt)).scalar_one()


async def mark_noticed(session: AsyncSession, routed: Sequence[uuid.UUID], unrouted: Sequence[uuid.UUID]) -> None:
    """The broker confirmed these notices: routed ones make QUEUED tasks SENT; all leave the outbox.

    One UPDATE whatever the count: the ids travel as two array parameters, so the statement
    text never changes and is prepared once per connection.
    """
    routed_ids = bindparam("routed", list(routed), type_=ARRAY(Uuid()))
    confirmed_ids = bindparam("confirmed", [*routed, *unrouted], type_=ARRAY(Uuid()))
    becomes_sent = and_(Task.id == any_(routed_ids), Task.status == TaskStatus.QUEUED)

    def if_sent(value: Any, otherwise: Any) -> ColumnElement[Any]:
        return case((becomes_sent, value), else_=otherwise)

    now = func.now()
    sent = await session.execute(
        update(Task)
        .where(Task.id == any_(confirmed_ids), or_(Task.notice_due_at.is_not(None), becomes_sent))
        .values(
            notice_due_at=None,
            status=if_sent(TaskStatus.SENT.value, Task.status),
            version=if_sent(Task.version + 1, Task.version),
            sent_at=if_sent(now, Task.sent_at),
            updated_at=if_sent(now, Task.updated_at),
        )
        # now() is the transaction's time: only a row made SENT by this statement has it as sent_at.
        .returning(Task.created_at, Task.sent_at, Task.sent_at == now)
        .execution_options(synchronize_session=False)
    )
    for created_at, sent_at, made_sent in sent:
        if made_sent:
            metrics.CREATED_TO_SENT.observe(metrics.seconds_between(created_at, sent_at))


async def notices_due(
    session: AsyncSession, older_than_s: float, limit: int, lease_s: float = 0.0
) -> list[tuple[uuid.UUID, str]]:
    """Tasks whose notice was never confirmed (publish failed, or the process died after commit);
    their due time moves `lease_s` ahead, the time the caller needs to send them."""
    stmt = (
        select(Task.id, Task.device_id)
        .where(Task.notice_due_at < func.now() - _seconds(older_than_s))
        .order_by(Task.notice_due_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = (await session.execute(stmt)).all()
    if rows:
        # Push the due time forward so another replica does not send the same notices meanwhile.
        await session.execute(
            update(Task)
            .where(Task.id.in_([r.id for r in rows]))
            .values(notice_due_at=func.now() + _seconds(lease_s))
            .execution_options(synchronize_session=False)
        )
    return [(r.id, r.device_id) for r in rows]


async def lock_overdue(session: AsyncSession, limit: int, skip: Sequence[uuid.UUID] = ()) -> Sequence[Task]:
    stmt = (
        select(Task)
        .where(Task.status == TaskStatus.IN_PROGRESS, Task.deadline_at < func.now(), Task.id.not_in(skip))
        .order_by(Task.deadline_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return (await session.execute(stmt)).scalars().all()


async def lock_expired(session: AsyncSession, limit: int, skip: Sequence[uuid.UUID] = ()) -> Sequence[Task]:
    stmt = (
        select(Task)
        .where(Task.status.in_(_PENDING), Task.expires_at < func.now(), Task.id.not_in(skip))
        .order_by(Task.expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return (await session.execute(stmt)).scalars().all()


async def lock_pending_of_device(session: AsyncSession, device_id: str) -> Sequence[Task]:
    stmt = (
        select(Task)
        .where(Task.device_id == device_id, Task.status.in_([*_PENDING, TaskStatus.IN_PROGRESS]))
        .with_for_update()
    )
    return (await session.execute(stmt)).scalars().all()


async def list_tasks(
    session: AsyncSession, filters: TaskFilter, after: tuple[datetime, uuid.UUID] | None, limit: int
) -> Sequence[Task]:
    """Newest first; `after` is the (created_at, id) of the last row of the previous page."""
    conditions: list[ColumnElement[bool]] = []
    if filters.device_id is not None:
        conditions.append(Task.device_id == filters.device_id)
    if filters.batch_id is not None:
        conditions.append(Task.batch_id == filters.batch_id)
    statuses = list(dict.fromkeys(filters.status or ()))
    if len(statuses) == 1:
        conditions.append(Task.status == statuses[0].value)
    if filters.method is not None:
        conditions.append(Task.method == filters.method)
    if filters.created_after is not None:
        conditions.append(Task.created_at >= filters.created_after)
    if filters.created_before is not None:
        conditions.append(Task.created_at < filters.created_before)
    if after is not None:
        conditions.append(tuple_(Task.created_at, Task.id) < tuple_(*after))

    def newest(*more: ColumnElement[bool]) -> Select[Task]:
        stmt = select(Task).where(and_(True, *conditions, *more))
        return stmt.order_by(Task.created_at.desc(), Task.id.desc()).limit(limit)

    if len(statuses) < 2:
        return (await session.execute(newest())).scalars().all()
    # Several statuses: the newest of each (one range of ix_tasks_status_created each), merged.
    # `status IN (...) ORDER BY created_at LIMIT` walks ix_tasks_created past every newer task of
    # another status: 333,000 pages for failed,timed_out under 450,000 newer queued ones.
    merged = union_all(*(newest(Task.status == status.value) for status in statuses)).subquery()
    task = aliased(Task, merged)
    stmt = select(task).order_by(task.created_at.desc(), task.id.desc()).limit(limit)
    return (await session.execute(stmt)).scalars().all()


async def list_events(session: AsyncSession, task_id: uuid.UUID) -> Sequence[TaskEvent]:
    stmt = select(TaskEvent).where(TaskEvent.task_id == task_id).order_by(TaskEvent.version)
    return (await session.execute(stmt)).scalars().all()


async def get_batch_by_key(session: AsyncSession, key: str) -> TaskBatch | None:
    return (await session.execute(select(TaskBatch).where(TaskBatch.idempotency_key == key))).scalar_one_or_none()


async def insert_batch_tasks(
    session: AsyncSession, batch: TaskBatch, template: NewTask, device_ids: list[str], notice_due_at: datetime
) -> list[tuple[uuid.UUID, str]]:
    """One task per device that exists and is not revoked, copied from `template`, in one
    INSERT ... SELECT FROM unnest(...) JOIN devices; returns the (task id, device id) pairs."""
    session.add(batch)
    await session.flush()
    copied = ("method", "params", "priority", "max_attempts", "timeout_s", "expires_at")
    named = (
        func.unnest(bindparam("device_ids", device_ids, type_=ARRAY(String)))
        .table_valued("device_id")
        .render_derived("r")
    )
    devices = table("devices", column("id", String), column("revoked_at"))
    rows = select(
        func.gen_random_uuid(),
        devices.c.id,
        literal(batch.id, type_=Uuid),
        *(literal(getattr(template, name), type_=Task.__table__.c[name].type) for name in copied),
        literal(notice_due_at, type_=Task.__table__.c.notice_due_at.type),
    ).join_from(named, devices, and_(devices.c.id == named.c.device_id, devices.c.revoked_at.is_(None)))
    columns = ["id", "device_id", "batch_id", *copied, "notice_due_at"]
    stmt = insert(Task).from_select(columns, rows).returning(Task.id, Task.device_id)
    return [(row.id, row.device_id) for row in await session.execute(stmt)]
