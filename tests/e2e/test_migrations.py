"""Migrations on a database of their own: no trigger notifies at head, the downgrade of
7a0c0e1d2b01 restores the notify triggers exactly as they were, and that of b3a7c1e0d204 the
foreign keys of tasks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from alembic.config import Config
from sqlalchemy.engine import URL, make_url

from alembic import command
from app.settings import Settings
from tests.conftest import ROOT

BEFORE_POLLING = "0fe196a2d66f"
BEFORE_CHECKS_PER_STATEMENT = "7a0c0e1d2b03"
DATABASE = "swarm_test_migrations"

Schema = tuple[dict[str, str], dict[str, str]]


@pytest.fixture
async def scratch_url(settings: Settings) -> AsyncIterator[URL]:
    url = make_url(settings.database.url.get_secret_value()).set(database=DATABASE)
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        yield url
        await conn.execute(f'DROP DATABASE "{DATABASE}" WITH (FORCE)')
    finally:
        await conn.close()


async def migrate(url: URL, step: str, revision: str) -> Schema:
    """Run `alembic <step> <revision>` (in a thread: env.py runs its own event loop), then read
    the triggers and the definitions of the functions."""
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = url.render_as_string(hide_password=False)
    config.attributes["configure_logger"] = False
    await asyncio.to_thread(getattr(command, step), config, revision)
    conn = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        triggers = await conn.fetch("SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal")
        functions = await conn.fetch(
            "SELECT proname, pg_get_functiondef(oid) FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
        )
    finally:
        await conn.close()
    return dict(triggers), dict(functions)


async def test_no_trigger_notifies_and_the_downgrade_restores_them(scratch_url: URL) -> None:
    before = await migrate(scratch_url, "upgrade", BEFORE_POLLING)
    triggers, functions = await migrate(scratch_url, "upgrade", "head")

    assert not [name for name, definition in functions.items() if "pg_notify" in definition]
    # The audit, event-log and final-state guard triggers stay.
    assert {"tasks_record_event", "tasks_guard_final", "devices_record_event"} <= triggers.keys()
    assert not {"task_events_notify", "device_events_notify"} & triggers.keys()
    assert "INSERT INTO task_events" in functions["tasks_record_event"]

    assert await migrate(scratch_url, "downgrade", BEFORE_POLLING) == before
    assert "pg_notify('swarm_task_final'" in before[1]["tasks_record_event"]


async def foreign_keys_of_tasks(url: URL) -> set[str]:
    conn = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        rows = await conn.fetch(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'tasks'::regclass AND contype = 'f'"
        )
    finally:
        await conn.close()
    return {row["conname"] for row in rows}


async def test_the_downgrade_of_b3a7c1e0d204_restores_the_foreign_keys_of_tasks(scratch_url: URL) -> None:
    before = await migrate(scratch_url, "upgrade", BEFORE_CHECKS_PER_STATEMENT)
    keys_before = await foreign_keys_of_tasks(scratch_url)
    triggers, functions = await migrate(scratch_url, "upgrade", "head")

    assert not await foreign_keys_of_tasks(scratch_url)
    assert {"tasks_check_parents", "tasks_keep_references", "devices_stay", "task_batches_stay"} <= triggers.keys()
    assert "enable_seqscan TO 'off'" in functions["tasks_record_inserted"]

    assert await migrate(scratch_url, "downgrade", BEFORE_CHECKS_PER_STATEMENT) == before
    assert (
        await foreign_keys_of_tasks(scratch_url)
        == keys_before
        == {
            "fk_tasks_device_id_devices",
            "fk_tasks_batch_id_task_batches",
        }
    )
