"""Migrations on a database of their own: up to head, down to nothing and up again gives the same
schema, and the lifecycle trigger comes and goes with its own migration."""

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

LIFECYCLE = "5c1f0a9d7e52"
DATABASE = "swarm_test_migrations"

# What a schema is made of, as PostgreSQL describes it back.
CATALOG = {
    "columns": "SELECT table_name || '.' || column_name, concat_ws(' ', data_type, is_nullable, column_default) "
    "FROM information_schema.columns WHERE table_schema = 'public'",
    "constraints": "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
    "WHERE connamespace = 'public'::regnamespace",
    "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'",
    "triggers": "SELECT tgname || ' ON ' || tgrelid::regclass, pg_get_triggerdef(oid) FROM pg_trigger "
    "WHERE NOT tgisinternal",
    "functions": "SELECT proname, pg_get_functiondef(oid) FROM pg_proc WHERE pronamespace = 'public'::regnamespace",
}

Schema = dict[str, dict[str, str]]


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
    the schema, alembic's own table left out."""
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = url.render_as_string(hide_password=False)
    config.attributes["configure_logger"] = False
    await asyncio.to_thread(getattr(command, step), config, revision)
    conn = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        schema = {kind: dict(await conn.fetch(query)) for kind, query in CATALOG.items()}
    finally:
        await conn.close()
    return {kind: {k: v for k, v in rows.items() if "alembic_version" not in k} for kind, rows in schema.items()}


async def test_down_to_nothing_and_up_again_gives_the_same_schema(scratch_url: URL) -> None:
    at_head = await migrate(scratch_url, "upgrade", "head")
    assert {"tasks.status", "task_events.details", "devices.revoked_at"} <= at_head["columns"].keys()
    assert {"tasks_guard_final ON tasks", "tasks_record_event ON tasks", "tasks_lifecycle ON tasks"} <= at_head[
        "triggers"
    ].keys()
    # No trigger notifies: wake-ups come from polling (decision on app/events/feed.py).
    assert not [name for name, definition in at_head["functions"].items() if "pg_notify" in definition]
    # A task's device and batch are checked by triggers, not foreign keys.
    assert not [name for name in at_head["constraints"] if name.startswith("fk_tasks_")]

    assert await migrate(scratch_url, "downgrade", "base") == {kind: {} for kind in CATALOG}
    assert await migrate(scratch_url, "upgrade", "head") == at_head


async def test_the_lifecycle_trigger_comes_and_goes_with_its_migration(scratch_url: URL) -> None:
    before = await migrate(scratch_url, "upgrade", f"{LIFECYCLE}-1")
    after = await migrate(scratch_url, "upgrade", LIFECYCLE)
    assert after["triggers"].keys() - before["triggers"].keys() == {"tasks_lifecycle ON tasks"}
    assert after["functions"].keys() - before["functions"].keys() == {"tasks_lifecycle"}
    assert await migrate(scratch_url, "downgrade", f"{LIFECYCLE}-1") == before
