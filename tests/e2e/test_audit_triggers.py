"""The audit triggers, past the service: every statement that adds or changes tasks leaves one
event per task whose version it set, whatever the number of rows (migration 7a0c0e1d2b03)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from alembic.config import Config
from sqlalchemy.engine import make_url

from alembic import command
from app.settings import Settings
from app.tasks.waiters import asyncpg_dsn
from tests.conftest import ROOT, unique_device_id

INSERT_TASKS = """
INSERT INTO tasks (id, device_id, method, params, status, max_attempts, timeout_s, result)
SELECT id, $2, 'echo', '{}', status, 3, 300, result
FROM unnest($1::uuid[], $3::text[], $4::jsonb[]) AS t (id, status, result)
"""


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(settings.database.url.get_secret_value()))
    try:
        yield conn
    finally:
        await conn.close()


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


class Notices:
    """What a LISTENing connection receives, up to a marker this test sends last: a session's
    notices arrive in order, so whatever came before the marker is all there was."""

    def __init__(self, listener: asyncpg.Connection, sender: asyncpg.Connection) -> None:
        self._listener, self._sender = listener, sender
        self._received: list[tuple[str, str]] = []
        self._marker = asyncio.Event()

    def _on_notice(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        if payload == "marker":
            self._marker.set()
        else:
            self._received.append((channel, payload))

    async def __aenter__(self) -> Notices:
        for channel in ("swarm_task_final", "swarm_events"):
            await self._listener.add_listener(channel, self._on_notice)
        return self

    async def __aexit__(self, *_: object) -> None:
        for channel in ("swarm_task_final", "swarm_events"):
            await self._listener.remove_listener(channel, self._on_notice)

    async def until_marker(self) -> list[tuple[str, str]]:
        """The notices received since the previous call."""
        await self._sender.execute("SELECT pg_notify('swarm_events', 'marker')")
        await asyncio.wait_for(self._marker.wait(), 10)
        received, self._received = self._received, []
        self._marker.clear()
        return received


@pytest.fixture
async def notices(settings: Settings, db: asyncpg.Connection) -> AsyncIterator[Notices]:
    listener = await asyncpg.connect(asyncpg_dsn(settings.database.url.get_secret_value()))
    try:
        async with Notices(listener, db) as received:
            yield received
    finally:
        await listener.close()


async def test_a_multi_row_insert_writes_one_event_per_task_in_order(
    db: asyncpg.Connection, device: str, notices: Notices
) -> None:
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
    # One wake-up for the event streams, one notice per task inserted final.
    assert await notices.until_marker() == [
        ("swarm_events", ""),
        ("swarm_task_final", str(ids[1])),
        ("swarm_task_final", str(ids[3])),
    ]


async def test_a_multi_row_update_writes_one_event_per_changed_version(
    db: asyncpg.Connection, device: str, notices: Notices
) -> None:
    ids = [uuid.uuid4() for _ in range(4)]
    await db.execute(INSERT_TASKS, ids, device, ["queued"] * 4, [None] * 4)
    await db.execute("UPDATE tasks SET status = 'sent', version = version + 1 WHERE id = ANY($1::uuid[])", ids[:3])
    # The result arrives for two of them; then the other two change without a new version.
    await db.execute(
        "UPDATE tasks SET status = 'succeeded', version = version + 1, "
        "result = jsonb_build_object('n', version), status_details = '{\"step\": null}' WHERE id = ANY($1::uuid[])",
        ids[:2],
    )
    await db.execute("UPDATE tasks SET priority = 5 WHERE id = ANY($1::uuid[])", ids[2:])

    events = await events_of(db, ids)
    assert [(e["task_id"], e["version"], e["status"]) for e in events] == [
        *((task_id, 1, "queued") for task_id in ids),
        *((task_id, 2, "sent") for task_id in ids[:3]),
        *((task_id, 3, "succeeded") for task_id in ids[:2]),
    ]
    # The event holds the row after the change; JSON nulls are left out.
    assert [json.loads(e["details"]) for e in events[-2:]] == [{"result": {"n": 2}, "status_details": {}}] * 2
    # A wake-up per statement that added events; a notice per task that became final.
    assert await notices.until_marker() == [
        *[("swarm_events", "")] * 3,
        ("swarm_task_final", str(ids[0])),
        ("swarm_task_final", str(ids[1])),
    ]


async def test_statements_that_add_no_event_wake_no_one(db: asyncpg.Connection, device: str, notices: Notices) -> None:
    ids = [uuid.uuid4(), uuid.uuid4()]
    await db.execute(INSERT_TASKS, ids, device, ["queued", "queued"], [None, None])
    assert await notices.until_marker() == [("swarm_events", "")]

    await db.execute(INSERT_TASKS, [], device, [], [])
    await db.execute("UPDATE tasks SET notice_due_at = NULL WHERE id = ANY($1::uuid[])", ids)
    await db.execute("UPDATE tasks SET priority = 1 WHERE id = ANY($1::uuid[])", ids)
    assert await notices.until_marker() == []
    assert len(await events_of(db, ids)) == 2


async def test_the_downgrade_restores_the_row_triggers(settings: Settings) -> None:
    url = make_url(settings.database.url.get_secret_value()).set(database="swarm_test_audit_migration")
    admin = await asyncpg.connect(asyncpg_dsn(settings.database.url.get_secret_value()))
    await admin.execute(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{url.database}"')
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = url.render_as_string(hide_password=False)
    config.attributes["configure_logger"] = False
    try:
        await asyncio.to_thread(command.upgrade, config, "0fe196a2d66f")
        before = await _triggers(url.render_as_string(hide_password=False))
        await asyncio.to_thread(command.upgrade, config, "7a0c0e1d2b03")
        after = await _triggers(url.render_as_string(hide_password=False))
        await asyncio.to_thread(command.downgrade, config, "0fe196a2d66f")
        assert await _triggers(url.render_as_string(hide_password=False)) == before != after
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
        await admin.close()


async def _triggers(sqlalchemy_url: str) -> list[str]:
    conn = await asyncpg.connect(asyncpg_dsn(sqlalchemy_url))
    try:
        rows = await conn.fetch(
            "SELECT pg_get_triggerdef(oid) AS definition FROM pg_trigger "
            "WHERE tgrelid = 'tasks'::regclass AND NOT tgisinternal ORDER BY tgname"
        )
        functions = await conn.fetch(
            "SELECT pg_get_functiondef(oid) AS definition FROM pg_proc WHERE proname LIKE 'tasks\\_%' ORDER BY proname"
        )
        return [r["definition"] for r in (*rows, *functions)]
    finally:
        await conn.close()
