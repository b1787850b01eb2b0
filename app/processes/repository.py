"""SQL for processes: plain async functions, SQL in, ORM objects out. Never commits."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, literal, null, select, union_all, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.devices.models import Device
from app.events.models import DeviceEvent
from app.processes.models import (
    ProcessDefinition,
    ProcessEvent,
    ProcessInstance,
    ProcessOutbox,
    ProcessStep,
    ProcessTrigger,
    ProcessTriggerCursor,
)
from app.tasks.models import Task, TaskEvent
from swarm_device.protocol import FINAL_STATUSES

_FINAL = [s.value for s in FINAL_STATUSES]
FINAL = frozenset(_FINAL)


# --- definitions -------------------------------------------------------------------------------


async def newest_version(session: AsyncSession, name: str) -> int:
    return int(
        await session.scalar(select(func.max(ProcessDefinition.version)).where(ProcessDefinition.name == name)) or 0
    )


async def get_definition(session: AsyncSession, name: str, version: int | None) -> ProcessDefinition | None:
    query = select(ProcessDefinition).where(ProcessDefinition.name == name)
    if version is not None:
        return await session.scalar(query.where(ProcessDefinition.version == version))
    return await session.scalar(query.order_by(ProcessDefinition.version.desc()).limit(1))


async def get_definition_by_id(session: AsyncSession, definition_id: uuid.UUID) -> ProcessDefinition | None:
    return await session.get(ProcessDefinition, definition_id)


async def definition_names(session: AsyncSession) -> set[str]:
    return set((await session.scalars(select(ProcessDefinition.name).distinct())).all())


async def list_definitions(session: AsyncSession, name: str | None) -> Sequence[ProcessDefinition]:
    """Every version of `name`, or the newest version of every name."""
    if name is not None:
        query = select(ProcessDefinition).where(ProcessDefinition.name == name).order_by(ProcessDefinition.version)
        return (await session.scalars(query)).all()
    query = (
        select(ProcessDefinition)
        .distinct(ProcessDefinition.name)
        .order_by(ProcessDefinition.name, ProcessDefinition.version.desc())
    )
    return (await session.scalars(query)).all()


# --- instances and steps -------------------------------------------------------------------------


async def lock_instance(
    session: AsyncSession, instance_id: uuid.UUID, *, skip_locked: bool = False
) -> ProcessInstance | None:
    """The instance, locked for this transaction: every change of an instance holds this lock."""
    query = select(ProcessInstance).where(ProcessInstance.id == instance_id).with_for_update(skip_locked=skip_locked)
    return await session.scalar(query)


async def get_instance(session: AsyncSession, instance_id: uuid.UUID) -> ProcessInstance | None:
    return await session.get(ProcessInstance, instance_id)


async def instance_by_start_key(session: AsyncSession, key: str) -> ProcessInstance | None:
    return await session.scalar(select(ProcessInstance).where(ProcessInstance.start_key == key))


async def list_instances(
    session: AsyncSession,
    *,
    status: str | None,
    name: str | None,
    device_id: str | None,
    before: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> Sequence[ProcessInstance]:
    """Newest first; `before` is the (created_at, id) of the last one of the previous page."""
    query = select(ProcessInstance)
    if status is not None:
        query = query.where(ProcessInstance.status == status)
    if name is not None:
        query = query.where(ProcessInstance.name == name)
    if device_id is not None:
        query = query.where(ProcessInstance.device_id == device_id)
    if before is not None:
        query = query.where(func.row(ProcessInstance.created_at, ProcessInstance.id) < func.row(*before))
    query = query.order_by(ProcessInstance.created_at.desc(), ProcessInstance.id.desc()).limit(limit)
    return (await session.scalars(query)).all()


async def steps_of(session: AsyncSession, instance_id: uuid.UUID, *, open_only: bool = False) -> Sequence[ProcessStep]:
    query = select(ProcessStep).where(ProcessStep.instance_id == instance_id)
    if open_only:
        query = query.where(ProcessStep.status == "open")
    return (await session.scalars(query.order_by(ProcessStep.id))).all()


async def history_of(session: AsyncSession, instance_id: uuid.UUID) -> Sequence[ProcessEvent]:
    query = select(ProcessEvent).where(ProcessEvent.instance_id == instance_id).order_by(ProcessEvent.id)
    return (await session.scalars(query)).all()


async def get_step(session: AsyncSession, step_id: int) -> ProcessStep | None:
    return await session.get(ProcessStep, step_id)


async def work_list(session: AsyncSession, roles: Sequence[str], limit: int) -> Sequence[ProcessStep]:
    query = (
        select(ProcessStep)
        .where(ProcessStep.status == "open", ProcessStep.role.in_(roles))
        .order_by(ProcessStep.id)
        .limit(limit)
    )
    return (await session.scalars(query)).all()


async def reported_state(session: AsyncSession, device_id: str | None) -> dict[str, Any]:
    if device_id is None:
        return {}
    return await session.scalar(select(Device.reported_state).where(Device.id == device_id)) or {}


async def running_instance_exists(session: AsyncSession, name: str, device_id: str) -> bool:
    query = select(ProcessInstance.id).where(
        ProcessInstance.name == name, ProcessInstance.device_id == device_id, ProcessInstance.status == "running"
    )
    return await session.scalar(query.limit(1)) is not None


# --- what the jobs look for ------------------------------------------------------------------------


async def steps_with_final_tasks(session: AsyncSession, limit: int) -> Sequence[tuple[int, uuid.UUID]]:
    """Open device-task steps whose task is final: (step id, instance id)."""
    query = (
        select(ProcessStep.id, ProcessStep.instance_id)
        .join(Task, Task.id == ProcessStep.task_id)
        .where(ProcessStep.status == "open", ProcessStep.task_id.is_not(None), Task.status.in_(_FINAL))
        .limit(limit)
    )
    return [(row[0], row[1]) for row in (await session.execute(query)).all()]


async def due_steps(session: AsyncSession, limit: int) -> Sequence[tuple[int, uuid.UUID]]:
    query = (
        select(ProcessStep.id, ProcessStep.instance_id)
        .where(ProcessStep.status == "open", ProcessStep.due_at.is_not(None), ProcessStep.due_at <= func.now())
        .order_by(ProcessStep.due_at)
        .limit(limit)
    )
    return [(row[0], row[1]) for row in (await session.execute(query)).all()]


async def task_outcome(session: AsyncSession, task_id: uuid.UUID) -> tuple[str, Any, Any]:
    """A task's status, result and error."""
    row = (await session.execute(select(Task.status, Task.result, Task.error).where(Task.id == task_id))).one()
    return row[0], row[1], row[2]


# --- the outbox ----------------------------------------------------------------------------------------


async def lease_due_notifications(session: AsyncSession, limit: int, lease_s: float) -> Sequence[ProcessOutbox]:
    """Due notifications, leased for `lease_s` (due again then if the sender died meanwhile)."""
    query = (
        select(ProcessOutbox)
        .where(ProcessOutbox.sent_at.is_(None), ProcessOutbox.due_at <= func.now())
        .order_by(ProcessOutbox.due_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = (await session.scalars(query)).all()
    if rows:
        await session.execute(
            update(ProcessOutbox)
            .where(ProcessOutbox.id.in_([r.id for r in rows]))
            .values(due_at=func.now() + func.make_interval(0, 0, 0, 0, 0, 0, lease_s))
        )
    return rows


async def mark_sent(session: AsyncSession, notification_id: int) -> None:
    await session.execute(
        update(ProcessOutbox).where(ProcessOutbox.id == notification_id).values(sent_at=func.now(), last_error=None)
    )


async def mark_failed(session: AsyncSession, notification_id: int, error: str, retry_in_s: float) -> None:
    await session.execute(
        update(ProcessOutbox)
        .where(ProcessOutbox.id == notification_id)
        .values(
            attempts=ProcessOutbox.attempts + 1,
            last_error=error[:2000],
            due_at=func.now() + func.make_interval(0, 0, 0, 0, 0, 0, retry_in_s),
        )
    )


# --- triggers ------------------------------------------------------------------------------------------


async def enabled_triggers(session: AsyncSession) -> Sequence[ProcessTrigger]:
    return (await session.scalars(select(ProcessTrigger).where(ProcessTrigger.enabled))).all()


async def list_triggers(session: AsyncSession) -> Sequence[ProcessTrigger]:
    return (await session.scalars(select(ProcessTrigger).order_by(ProcessTrigger.created_at))).all()


async def lock_trigger_cursor(session: AsyncSession) -> ProcessTriggerCursor | None:
    """The one cursor row, locked (None if another process holds it: it scans meanwhile)."""
    query = select(ProcessTriggerCursor).where(ProcessTriggerCursor.id == 1).with_for_update(skip_locked=True)
    return await session.scalar(query)


async def states_reported_between(
    session: AsyncSession, after: datetime, until: datetime, limit: int
) -> Sequence[tuple[str, dict[str, Any], datetime]]:
    query = (
        select(Device.id, Device.reported_state, Device.reported_at)
        .where(Device.reported_at > after, Device.reported_at <= until, Device.reported_state.is_not(None))
        .order_by(Device.reported_at)
        .limit(limit)
    )
    return [(row[0], row[1], row[2]) for row in (await session.execute(query)).all()]


@dataclass(frozen=True, slots=True)
class LogEvent:
    id: int
    kind: str  # task, device or process
    name: str
    device_id: str | None
    method: str | None
    created_at: datetime


async def trigger_events_after(session: AsyncSession, after: int, limit: int) -> list[LogEvent]:
    """Task, device and process events after id `after`, oldest first (the process events
    are there so that their ids are no gaps)."""
    task_events = (
        select(
            TaskEvent.id,
            literal("task").label("kind"),
            TaskEvent.status.label("name"),
            Task.device_id,
            Task.method,
            TaskEvent.created_at,
        )
        .join(Task, Task.id == TaskEvent.task_id)
        .where(TaskEvent.id > after)
        .order_by(TaskEvent.id)
        .limit(limit)
    )
    device_events = (
        select(
            DeviceEvent.id, literal("device"), DeviceEvent.event, DeviceEvent.device_id, null(), DeviceEvent.created_at
        )
        .where(DeviceEvent.id > after)
        .order_by(DeviceEvent.id)
        .limit(limit)
    )
    process_events = (
        select(
            ProcessEvent.id,
            literal("process"),
            ProcessEvent.type,
            ProcessEvent.device_id,
            null(),
            ProcessEvent.created_at,
        )
        .where(ProcessEvent.id > after)
        .order_by(ProcessEvent.id)
        .limit(limit)
    )
    both = union_all(task_events, device_events, process_events).subquery()
    rows = (await session.execute(select(both).order_by(both.c.id).limit(limit))).all()
    return [LogEvent(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]
