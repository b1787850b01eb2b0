"""Shared fixtures: a real PostgreSQL and RabbitMQ (the project's `test` stack), the app in-process.

The stack is started (idempotently) by `scripts/stack.sh services` with SWARM_STACK=test; the
database `swarm_test` is dropped, re-created and migrated with `alembic upgrade head` once per run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from alembic.config import Config
from asgi_lifespan import LifespanManager
from sqlalchemy.engine import make_url
from starlette.types import ASGIApp

from alembic import command
from app.auth import ROLE_SCOPE_PREFIX, Scope, mint_token
from app.db import Sessions, asyncpg_dsn, create_engine, create_sessionmaker
from app.devices import service as devices
from app.devices.broker_admin import BrokerAdmin
from app.main import create_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
STACK = os.environ.get("SWARM_TEST_STACK", "test")
STACK_DIR = ROOT / ".run" / STACK
TEST_DATABASE = "swarm_test"


def _start_stack() -> dict[str, str]:
    env = {**os.environ, "SWARM_STACK": STACK}
    subprocess.run([str(ROOT / "scripts" / "stack.sh"), "services"], check=True, env=env, cwd=ROOT)
    values: dict[str, str] = {}
    for line in (STACK_DIR / "app.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The fault tests run the app as OS processes and must be the only consumers of the stack's
    # queues: they go first, before any test starts the in-process app (a session fixture).
    items.sort(key=lambda item: item.get_closest_marker("faults") is None)


@pytest.fixture(scope="session")
def stack_env() -> dict[str, str]:
    return _start_stack()


async def _recreate_database(url: str) -> None:
    admin_dsn = make_url(url).set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{TEST_DATABASE}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{TEST_DATABASE}"')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def settings(stack_env: dict[str, str]) -> Settings:
    stack_url = Settings(_env_file=STACK_DIR / "app.env").database.url.get_secret_value()
    url = make_url(stack_url).set(database=TEST_DATABASE).render_as_string(hide_password=False)
    asyncio.run(_recreate_database(url))
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = url
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")
    settings = Settings(_env_file=STACK_DIR / "app.env", database={"url": url}, **FAST_JOBS)
    asyncio.run(_forget_earlier_devices(settings))
    return settings


async def _forget_earlier_devices(settings: Settings) -> None:
    """Broker users of earlier runs' devices are strays for the fresh database: remove them now,
    so that the app's start-up reconciliation has nothing to do."""
    admin = BrokerAdmin.from_settings(settings.broker)
    engine = create_engine(settings.database)
    try:
        await devices.reconcile_broker_users(create_sessionmaker(engine), admin)
    finally:
        await admin.aclose()
        await engine.dispose()


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to the test database, for SQL past the app."""
    conn = await asyncpg.connect(asyncpg_dsn(settings.database.url.get_secret_value()))
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def sessions(settings: Settings) -> AsyncIterator[Sessions]:
    """A session factory of the test database, for calling services past the app."""
    engine = create_engine(settings.database)
    try:
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Where the tests' in-process SMTP server listens (tests/e2e/test_processes.py).
SMTP_PORT = _free_port()

# Periodic jobs every half second, so that deadlines, expiry, re-sent notices and lifted blocks
# show within a test (blocks last 3 s).
FAST_JOBS: dict[str, Any] = {
    "scheduler": {
        "deadlines_interval_s": 0.5,
        "expiry_interval_s": 0.5,
        "notices_interval_s": 0.5,
        "processes_interval_s": 0.5,
        "blocks_interval_s": 0.5,
    },
    "tasks": {"notice_retry_after_s": 1.0},
    "processes": {"smtp": {"port": SMTP_PORT}, "retry_after_s": 0.5, "retry_max_s": 2.0},
    "device_limits": {"block_s": 3.0},
}


def bearer(settings: Settings, *scopes: Scope) -> dict[str, str]:
    """An Authorization header with a token of the stack's key (default: every scope and role), e.g. for
    an app started as a subprocess with the stack's app.env."""
    every = [*Scope, *(f"{ROLE_SCOPE_PREFIX}{role}" for role in settings.processes.roles)]
    return {"Authorization": f"Bearer {mint_token(settings.auth, 'tests', scopes or every, 3600)}"}


@pytest.fixture(scope="session")
async def asgi_app(settings: Settings) -> AsyncIterator[ASGIApp]:
    """The app in-process with its real lifespan (broker subscribers, scheduler)."""
    async with LifespanManager(create_app(settings), startup_timeout=60, shutdown_timeout=30) as manager:
        yield manager.app


@pytest.fixture(scope="session")
async def app_client(asgi_app: ASGIApp, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the in-process app, with an every-scope token."""
    transport = httpx.ASGITransport(app=asgi_app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://swarm.test/api/v1", headers=bearer(settings)
    ) as client:
        yield client


@dataclass(frozen=True)
class DeviceCredentials:
    device_id: str
    cert_file: Path
    key_file: Path
    ca_file: Path


def unique_device_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


EnrolDevice = Callable[..., Awaitable[DeviceCredentials]]


async def enrol(client: httpx.AsyncClient, device_id: str, folder: Path) -> DeviceCredentials:
    """Enrol a device through the API, have the core make its key and certificate, and write
    them to `folder` as `<id>.crt`, `<id>.key` and `ca.crt` (the simulator's layout)."""
    response = await client.post("/devices", json={"id": device_id})
    assert response.status_code == 201, response.text
    response = await client.post(f"/devices/{device_id}/certificate", json={})
    assert response.status_code == 201, response.text
    issued = response.json()
    creds = DeviceCredentials(device_id, folder / f"{device_id}.crt", folder / f"{device_id}.key", folder / "ca.crt")
    creds.cert_file.write_text(issued["certificate_pem"])
    creds.key_file.write_text(issued["private_key_pem"])
    creds.key_file.chmod(0o600)
    creds.ca_file.write_text(issued["ca_certificate_pem"])
    return creds


@pytest.fixture
def enrol_device(app_client: httpx.AsyncClient, tmp_path: Path) -> EnrolDevice:
    """Enrol a new device through the API and have the core make its key and certificate."""

    async def enrol_new(prefix: str = "t") -> DeviceCredentials:
        return await enrol(app_client, unique_device_id(prefix), tmp_path)

    return enrol_new
