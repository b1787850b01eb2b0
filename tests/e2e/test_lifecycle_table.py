"""The database's copy of the lifecycle table (trigger `tasks_lifecycle`), past the app: it allows
exactly app/tasks/lifecycle.py's changes of status, and gives every change the audit records one
new version and one event, whatever the statement writes."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from app.tasks.lifecycle import ALLOWED, TRANSITIONS
from swarm_device.protocol import TaskStatus
from tests.conftest import unique_device_id


class Refused(Exception):
    pass


class Undo(Exception):
    """Raised to roll back an attempt that the database accepted."""


def path_to(status: TaskStatus) -> list[TaskStatus]:
    """The statuses a new task passes through to reach `status` along the table (shortest)."""
    paths = {TaskStatus.QUEUED: [TaskStatus.QUEUED]}
    frontier = [TaskStatus.QUEUED]
    while status not in paths:
        source = frontier.pop(0)
        for t in TRANSITIONS:
            if t.source is source and t.target not in paths:
                paths[t.target] = [*paths[source], t.target]
                frontier.append(t.target)
    return paths[status]


async def new_task(db: asyncpg.Connection) -> uuid.UUID:
    """A QUEUED task of a device of its own (a device has one task in progress at most)."""
    device = unique_device_id("lifecycle")
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device)
    task_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO tasks (id, device_id, method, params, max_attempts, timeout_s) "
        "VALUES ($1, $2, 'echo', '{}', 3, 60)",
        task_id,
        device,
    )
    return task_id


async def versions(db: asyncpg.Connection, task_id: uuid.UUID) -> list[tuple[int, str]]:
    rows = await db.fetch("SELECT version, status FROM task_events WHERE task_id = $1 ORDER BY version", task_id)
    return [(row["version"], row["status"]) for row in rows]


async def test_the_database_allows_exactly_the_changes_of_the_table(db: asyncpg.Connection) -> None:
    allowed: set[tuple[TaskStatus, TaskStatus]] = set()
    for source in TaskStatus:
        task_id = await new_task(db)
        for step in path_to(source)[1:]:
            await db.execute("UPDATE tasks SET status = $2 WHERE id = $1", task_id, step.value)
        for target in set(TaskStatus) - {source}:
            try:
                async with db.transaction():
                    try:
                        await db.execute("UPDATE tasks SET status = $2 WHERE id = $1", task_id, target.value)
                    except asyncpg.CheckViolationError as exc:
                        raise Refused from exc
                    raise Undo
            except Undo:
                allowed.add((source, target))
            except Refused:
                pass
    assert allowed == ALLOWED


async def test_every_change_the_audit_records_gets_one_version_and_one_event(db: asyncpg.Connection) -> None:
    task_id = await new_task(db)
    # A status change written with a version of its own still counts once.
    await db.execute("UPDATE tasks SET status = 'in_progress', version = version + 1 WHERE id = $1", task_id)
    # A progress report: the details and the deadline change, the status does not.
    await db.execute(
        "UPDATE tasks SET status_details = '{\"step\": 1}', deadline_at = now() + interval '1 minute' WHERE id = $1",
        task_id,
    )
    # The outbox and the priority are not part of the history.
    await db.execute("UPDATE tasks SET notice_due_at = now(), priority = 7 WHERE id = $1", task_id)
    # (A final task has no notice due: the re-send job of other tests must not find this one.)
    await db.execute("UPDATE tasks SET status = 'succeeded', notice_due_at = NULL WHERE id = $1", task_id)

    assert await db.fetchval("SELECT version FROM tasks WHERE id = $1", task_id) == 4
    assert await versions(db, task_id) == [(1, "queued"), (2, "in_progress"), (3, "in_progress"), (4, "succeeded")]


async def test_a_refused_change_names_the_task_and_both_statuses(db: asyncpg.Connection) -> None:
    task_id = await new_task(db)
    with pytest.raises(asyncpg.CheckViolationError, match=f"task {task_id} cannot go from queued to succeeded"):
        await db.execute("UPDATE tasks SET status = 'succeeded' WHERE id = $1", task_id)
    assert await versions(db, task_id) == [(1, "queued")]
