"""What the foreign keys of `tasks` guaranteed still holds without them (the baseline migration,
decision 23): every task names a device and, if any, a batch that exist, checked once per INSERT
statement; a task's device and batch never change; devices and batches are never deleted."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from tests.conftest import unique_device_id

INSERT_TASKS = """
INSERT INTO tasks (id, device_id, batch_id, method, params, max_attempts, timeout_s)
SELECT gen_random_uuid(), d, $2, 'echo', '{}', 3, 300 FROM unnest($1::text[]) AS d
"""


@pytest.fixture
async def device(db: asyncpg.Connection) -> str:
    device_id = unique_device_id("refs")
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device_id)
    return device_id


@pytest.fixture
async def batch(db: asyncpg.Connection) -> uuid.UUID:
    batch_id = uuid.uuid4()
    await db.execute("INSERT INTO task_batches (id, request_hash, task_count) VALUES ($1, 'h', 1)", batch_id)
    return batch_id


async def tasks_of(db: asyncpg.Connection, device_id: str) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM tasks WHERE device_id = $1", device_id)
    return count


async def test_one_unknown_device_refuses_the_whole_statement(db: asyncpg.Connection, device: str) -> None:
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="device refs-nowhere does not exist"):
        await db.execute(INSERT_TASKS, [device, device, "refs-nowhere"], None)
    assert await tasks_of(db, device) == 0


async def test_an_unknown_batch_is_refused(db: asyncpg.Connection, device: str, batch: uuid.UUID) -> None:
    with pytest.raises(asyncpg.ForeignKeyViolationError, match=r"batch .* does not exist"):
        await db.execute(INSERT_TASKS, [device], uuid.uuid4())
    await db.execute(INSERT_TASKS, [device, device], batch)
    assert await tasks_of(db, device) == 2


async def test_a_tasks_device_and_batch_never_change(db: asyncpg.Connection, device: str, batch: uuid.UUID) -> None:
    other = unique_device_id("refs")
    await db.execute("INSERT INTO devices (id) VALUES ($1)", other)
    await db.execute(INSERT_TASKS, [device], batch)
    changes: list[tuple[str, object]] = [
        ("UPDATE tasks SET device_id = $2 WHERE device_id = $1", other),
        ("UPDATE tasks SET batch_id = $2 WHERE device_id = $1", None),
        ("UPDATE tasks SET batch_id = $2 WHERE device_id = $1", uuid.uuid4()),
    ]
    for statement, value in changes:
        with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="device and batch never change"):
            await db.execute(statement, device, value)
    # Setting them to what they are is no change; other columns change as before.
    await db.execute("UPDATE tasks SET device_id = $1, batch_id = $2, priority = 5 WHERE device_id = $1", device, batch)
    assert await db.fetchval("SELECT priority FROM tasks WHERE device_id = $1", device) == 5


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM devices WHERE id = '{device}'",
        "UPDATE devices SET id = 'renamed' WHERE id = '{device}'",
        "DELETE FROM task_batches WHERE id = '{batch}'",
        "UPDATE task_batches SET id = gen_random_uuid() WHERE id = '{batch}'",
    ],
)
async def test_devices_and_batches_are_never_deleted_nor_renamed(
    db: asyncpg.Connection, device: str, batch: uuid.UUID, statement: str
) -> None:
    await db.execute(INSERT_TASKS, [device], batch)
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="never deleted"):
        await db.execute(statement.format(device=device, batch=batch))
    assert await tasks_of(db, device) == 1
    assert await db.fetchval("SELECT count(*) FROM task_batches WHERE id = $1", batch) == 1


async def test_truncate_is_refused_and_revoking_still_works(db: asyncpg.Connection, device: str) -> None:
    for table in ("devices", "task_batches"):
        with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="never deleted"):
            await db.execute(f"TRUNCATE {table} CASCADE")
    await db.execute("UPDATE devices SET revoked_at = now() WHERE id = $1", device)
    assert await db.fetchval("SELECT revoked_at IS NOT NULL FROM devices WHERE id = $1", device)


async def test_deleting_a_task_still_deletes_its_events(db: asyncpg.Connection, device: str) -> None:
    await db.execute(INSERT_TASKS, [device], None)
    task_id = await db.fetchval("SELECT id FROM tasks WHERE device_id = $1", device)
    assert await db.fetchval("SELECT count(*) FROM task_events WHERE task_id = $1", task_id) == 1
    await db.execute("DELETE FROM tasks WHERE id = $1", task_id)
    assert await db.fetchval("SELECT count(*) FROM task_events WHERE task_id = $1", task_id) == 0
