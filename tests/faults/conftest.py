"""Fixtures of the fault tests: the app as OS processes on the test stack, and the stack's services.

These tests must be the only consumers of the stack's queues, so tests/conftest.py runs them
before any test starts the in-process app; `start_apps` checks that nobody else consumes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from app.settings import Settings
from tests.app_process import AppProcess
from tests.conftest import FAST_JOBS, ROOT, STACK, STACK_DIR, bearer
from tests.faults.harness import Fleet, enrol
from tests.management import wait_for_consumers

StartApps = Callable[[int], Awaitable[list[AppProcess]]]


@pytest.fixture
def app_env(stack_env: dict[str, str], settings: Settings) -> dict[str, str]:
    """The stack's app.env, pointed at the test database, with the fast periodic jobs."""
    env = dict(stack_env)
    env["APP_DATABASE__URL"] = settings.database.url.get_secret_value()
    env["APP_INSTANCE_NAME"] = "swarm-faults"
    env.update(_variables("APP_", FAST_JOBS))
    return env


def _variables(prefix: str, values: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Nested settings as APP_* variables (`__` nests)."""
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _variables(f"{prefix}{key}__", value)
        else:
            yield f"{prefix}{key}".upper(), str(value)


@pytest.fixture
async def start_apps(app_env: dict[str, str], settings: Settings) -> AsyncIterator[StartApps]:
    started: list[AppProcess] = []
    log_dir = STACK_DIR / "faults"
    log_dir.mkdir(exist_ok=True)

    async def start(count: int) -> list[AppProcess]:
        await wait_for_consumers(settings.broker, 0)  # nobody else, e.g. an in-process app
        port = int(app_env["SWARM_APP_PORT"])
        for i in range(count):
            app = AppProcess(f"app-{i + 1}", port + i, app_env, log_dir / f"app-{i + 1}.log")
            started.append(app)
            await app.start()
        return started

    yield start
    for app in started:
        await app.stop()


@pytest.fixture
def dsn(settings: Settings) -> str:
    url = make_url(settings.database.url.get_secret_value()).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


@asynccontextmanager
async def api_of(app: AppProcess, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"{app.url}/api/v1", headers=bearer(settings), timeout=15) as client:
        yield client


async def make_fleet(api: httpx.AsyncClient, settings: Settings, cert_dir: Path, count: int, prefix: str) -> Fleet:
    devices = [await enrol(api, cert_dir, f"{prefix}-{i}") for i in range(count)]
    return Fleet(settings, devices)


async def stack_service(action: str, service: str) -> float:
    """`scripts/stack.sh stop|start rabbitmq|postgres` on the test stack; returns the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    process = await asyncio.create_subprocess_exec(
        str(ROOT / "scripts" / "stack.sh"),
        action,
        service,
        env={**os.environ, "SWARM_STACK": STACK},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, output.decode(errors="replace")
    return loop.time() - started
