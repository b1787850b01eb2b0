"""SQL for the event log: task, device and process events share one id sequence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, Text, cast, func, literal, null, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from app.events.models import DeviceEvent
from app.processes.models import ProcessEvent
from app.tasks.models import Task, TaskEvent


async def events_after(session: AsyncSession, after: int, limit: int) -> Sequence[Row[Any]]:
    """Events with an id above `after`, oldest first, with the device of each (all devices, so
    that the reader sees gaps in the id sequence)."""
    tasks = select(
        TaskEvent.id,
        Task.device_id,
        TaskEvent.task_id,
        TaskEvent.version,
        TaskEvent.status.label("name"),
        TaskEvent.attempt,
        TaskEvent.details,
        TaskEvent.created_at,
    ).join(Task, Task.id == TaskEvent.task_id)
    devices = select(
        DeviceEvent.id,
        DeviceEvent.device_id,
        null(),
        null(),
        DeviceEvent.event,
        null(),
        null(),
        DeviceEvent.created_at,
    )
    processes = select(
        ProcessEvent.id,
        ProcessEvent.device_id,
        null(),
        null(),
        ProcessEvent.type,
        null(),
        func.jsonb_build_object(
            "instance_id", ProcessEvent.instance_id, "step", ProcessEvent.step, "details", ProcessEvent.details
        ),
        ProcessEvent.created_at,
    )
    # Each side is cut to `limit` in id order first, so PostgreSQL walks the id indexes from
    # `after` instead of sorting every later event (3.4 s per page at 1M tasks, 2 ms this way).
    both = union_all(
        tasks.where(TaskEvent.id > after).order_by(TaskEvent.id).limit(limit),
        devices.where(DeviceEvent.id > after).order_by(DeviceEvent.id).limit(limit),
        processes.where(ProcessEvent.id > after).order_by(ProcessEvent.id).limit(limit),
    ).subquery()
    return (await session.execute(select(both).order_by(both.c.id).limit(limit))).all()


async def last_event_id(session: AsyncSession) -> int:
    newest = union_all(
        select(func.max(TaskEvent.id)),
        select(func.max(DeviceEvent.id)),
        select(func.max(ProcessEvent.id)),
        select(literal(0)),
    )
    return int(await session.scalar(select(func.max(newest.subquery().c[0]))) or 0)


async def commits_marker(session: AsyncSession) -> str:
    """PostgreSQL's current snapshot (`xmin:xmax:in-progress xids`), read from memory, no table.
    It changes whenever a transaction that wrote (or locked) rows ends, in any session of any
    database of the server: its xid raises xmax or leaves the in-progress list, whatever the
    order of commits. Reads alone never change it."""
    return str(await session.scalar(select(cast(func.pg_current_snapshot(), Text))))
