"""The audit triggers, past the service: every statement that adds or changes tasks leaves one
event per task whose version it set, whatever the number of rows. The versions come from the
trigger `tasks_lifecycle` (tests/e2e/test_lifecycle_table.py)."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from tests.conftest import unique_device_id

INSERT_TASKS = """
INSERT INTO tasks (id, device_id, method, params, status, max_attempts, timeout_s, result)
SELECT id, $2, 'echo', '{}', status, 3, 300, result
FROM unnest($1::uuid[], $3::text[], $4::jsonb[]) AS t (id, status, result)
"""


@pytest.fixture
async def device(db: asyncpg.Connection) -> str:
    device_id = unique_device_id("audit")
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device_id)
    return device_id


async def events_of(db: asyncpg.Connection, ids: list[uuid.UUID]) -> list[asyncpg.Record]:
    events: list[asyncpg.Record] = await db.fetch(
        "SELECT id, task_id, version, status, attempt, details, created_at FROM task_events "
        "WHERE task_id = ANY($1::uuid[]) ORDER BY id",
        ids,
    )
    return events


async def test_a_multi_row_insert_writes_one_event_per_task_in_order(db: asyncpg.Connection, device: str) -> None:
    ids = [uuid.uuid4() for _ in range(5)]
    statuses = ["queued", "succeeded", "queued", "failed", "queued"]
    results = [None, json.dumps({"ok": True}), None, None, None]
    async with db.transaction():
        now = await db.fetchval("SELECT now()")
        await db.execute(INSERT_TASKS, ids, device, statuses, results)

    events = await events_of(db, ids)
    # Ids follow the order of the inserted rows, all stamped with the transaction's time.
    assert [e["task_id"] for e in events] == ids
    assert [(e["version"], e["status"], e["attempt"]) for e in events] == [(1, s, 0) for s in statuses]
    assert [e["details"] and json.loads(e["details"]) for e in events] == [None, {"result": {"ok": True}}, *[None] * 3]
    assert {e["created_at"] for e in events} == {now}


async def test_a_multi_row_update_writes_one_event_per_changed_version(db: asyncpg.Connection, device: str) -> None:
    ids = [uuid.uuid4() for _ in range(4)]
    await db.execute(INSERT_TASKS, ids, device, ["queued"] * 4, [None] * 4)
    await db.execute("UPDATE tasks SET status = 'sent' WHERE id = ANY($1::uuid[])", ids[:3])
    # Two of them are canceled; then the other two change without a new version.
    await db.execute(
        "UPDATE tasks SET status = 'canceled', "
        "error = jsonb_build_object('n', version), status_details = '{\"step\": null}' WHERE id = ANY($1::uuid[])",
        ids[:2],
    )
    await db.execute("UPDATE tasks SET priority = 5 WHERE id = ANY($1::uuid[])", ids[2:])

    # An UPDATE changes its rows in whatever order its plan finds them (an index scan: by id):
    # the events of one statement are compared in the order of `ids`.
    events = sorted(await events_of(db, ids), key=lambda e: (e["version"], ids.index(e["task_id"])))
    assert [(e["task_id"], e["version"], e["status"]) for e in events] == [
        *((task_id, 1, "queued") for task_id in ids),
        *((task_id, 2, "sent") for task_id in ids[:3]),
        *((task_id, 3, "canceled") for task_id in ids[:2]),
    ]
    # The event holds the row after the change; JSON nulls are left out.
    assert [json.loads(e["details"]) for e in events[-2:]] == [{"error": {"n": 2}, "status_details": {}}] * 2


async def test_statements_that_change_no_version_add_no_event(db: asyncpg.Connection, device: str) -> None:
    ids = [uuid.uuid4(), uuid.uuid4()]
    await db.execute(INSERT_TASKS, ids, device, ["queued", "queued"], [None, None])
    await db.execute(INSERT_TASKS, [], device, [], [])
    await db.execute("UPDATE tasks SET notice_due_at = NULL WHERE id = ANY($1::uuid[])", ids)
    await db.execute("UPDATE tasks SET priority = 1 WHERE id = ANY($1::uuid[])", ids)
    assert [(e["task_id"], e["version"]) for e in await events_of(db, ids)] == [(ids[0], 1), (ids[1], 1)]
