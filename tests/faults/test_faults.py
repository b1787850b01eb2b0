"""Nothing accepted is lost: the app killed, RabbitMQ and PostgreSQL restarted, two apps competing.

Each test runs a task load against the app as OS processes with SDK devices working the tasks,
injects its fault, waits until every task that got a 2xx is final, and checks the audit rows.
Run them alone with `pytest -m faults -s` to see what each did and counted.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.settings import Settings
from tests.app_process import AppProcess
from tests.faults.conftest import StartApps, api_of, make_fleet, stack_service
from tests.faults.harness import Fleet, Load, audit, until, wait_all_final
from tests.management import wait_for_consumers

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]


def prefix() -> str:
    return f"f{uuid.uuid4().hex[:6]}"


async def report(title: str, load: Load, dsn: str, settle_s: float, notes: list[str]) -> None:
    outcome = await audit(dsn, load)
    print(f"\n== {title}")
    for note in notes:
        print(f"   {note}")
    print(f"   {len(load.accepted)} tasks accepted (answers {dict(load.answers)}); all final {settle_s:.1f} s after")
    print(f"   {outcome.line()}")
    assert outcome.wrong_results == 0
    assert outcome.statuses.keys() <= {"succeeded", "timed_out"}


@dataclass
class UnderLoad:
    app: AppProcess
    api: httpx.AsyncClient
    fleet: Fleet
    load: Load
    settle_s: float = 0.0


@asynccontextmanager
async def one_app_under_load(
    start_apps: StartApps, settings: Settings, dsn: str, cert_dir: Path, warm_up: int, **load_options: Any
) -> AsyncIterator[UnderLoad]:
    """One app, five devices, and a load running; yields once `warm_up` tasks were accepted and
    returns when the whole load was accepted and every accepted task is final."""
    [app] = await start_apps(1)
    async with api_of(app, settings) as api:
        fleet = await make_fleet(api, settings, cert_dir, 5, prefix())
        load = Load([api], fleet.ids, **load_options)
        async with fleet.running():
            sender = asyncio.create_task(load.run())
            try:
                await until(lambda: len(load.accepted) >= warm_up)
                run = UnderLoad(app, api, fleet, load)
                yield run
                await sender
                run.settle_s = await wait_all_final(dsn, list(load.accepted))
            finally:
                sender.cancel()


async def pending_notices(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM tasks WHERE notice_due_at IS NOT NULL")
        return count
    finally:
        await conn.close()


async def test_kill_9_of_the_app_at_several_points(
    start_apps: StartApps, settings: Settings, dsn: str, tmp_path: Path
) -> None:
    notes: list[str] = []
    # 1. Right after a 201: the task is committed, its notice most likely not yet published.
    async with one_app_under_load(start_apps, settings, dsn, tmp_path, 40, total=300, work_ms=150) as run:

        async def kill_and_restart(point: str) -> None:
            await run.app.kill()
            unsent = await pending_notices(dsn)
            busy = run.fleet.busy()
            await asyncio.sleep(1)
            await run.app.start()
            notes.append(
                f"kill -9 {point}: {len(run.load.accepted)} accepted so far, {unsent} committed tasks without "
                f"a confirmed notice, {busy} devices mid-task"
            )

        await kill_and_restart("between commit and publish")
        # 2. While devices are running tasks (their results wait for the app to return).
        await until(lambda: len(run.load.accepted) >= 100 and run.fleet.busy() >= 3)
        await kill_and_restart("while devices are mid-task")
        # 3. The moment a handler finished: its result report is on the way.
        await until(lambda: len(run.load.accepted) >= 180)
        run.fleet.reporting.clear()
        await asyncio.wait_for(run.fleet.reporting.wait(), 30)
        await kill_and_restart("during a result report")
    await report("kill -9 of the app, three times, under load", run.load, dsn, run.settle_s, notes)


async def test_rabbitmq_restart_under_load(start_apps: StartApps, settings: Settings, dsn: str, tmp_path: Path) -> None:
    async with one_app_under_load(start_apps, settings, dsn, tmp_path, 60, total=240, pause_s=0.05) as run:
        before = len(run.load.accepted)
        stop_s = await stack_service("stop", "rabbitmq")
        await asyncio.sleep(2)
        start_s = await stack_service("start", "rabbitmq")
        accepted_meanwhile = len(run.load.accepted) - before
    await report(
        "RabbitMQ stopped and started under load",
        run.load,
        dsn,
        run.settle_s,
        [
            f"rabbitmq stop took {stop_s:.1f} s, down 2 s, start {start_s:.1f} s; "
            f"{accepted_meanwhile} tasks accepted meanwhile, delivered after it returned"
        ],
    )
    assert accepted_meanwhile > 0


async def test_postgres_restart_answers_503_and_recovers(
    start_apps: StartApps, settings: Settings, dsn: str, tmp_path: Path
) -> None:
    async with one_app_under_load(start_apps, settings, dsn, tmp_path, 50, total=200, pause_s=0.05) as run:
        await stack_service("stop", "postgres")
        probes: list[float] = []
        for _ in range(3):
            for method, path in (("POST", f"/devices/{run.fleet.ids[0]}/tasks"), ("GET", "/tasks")):
                started = time.monotonic()
                response = await run.api.request(method, path, json={"method": "work", "params": {"n": -1}})
                probes.append(time.monotonic() - started)
                assert response.status_code == 503, response.text
                assert response.headers["content-type"] == "application/problem+json"
                assert response.headers["retry-after"]
        async with httpx.AsyncClient(base_url=run.app.url) as plain:
            ready = await plain.get("/readyz")
        assert ready.status_code == 503
        await stack_service("start", "postgres")
        started = time.monotonic()
        while True:
            if (await run.api.get("/tasks", params={"limit": 1})).status_code == 200:
                break
            await asyncio.sleep(0.1)
        recovered_s = time.monotonic() - started
    await report(
        "PostgreSQL stopped and started under load",
        run.load,
        dsn,
        run.settle_s,
        [
            f"while down: {len(probes)} probes all 503 problem+json, slowest {max(probes):.2f} s; "
            f"/readyz {ready.status_code}",
            f"API answered 200 again {recovered_s:.2f} s after PostgreSQL was back, without a restart",
        ],
    )
    assert max(probes) < 10


async def test_two_apps_compete_and_every_task_is_handled_once(
    start_apps: StartApps, settings: Settings, dsn: str, tmp_path: Path
) -> None:
    apps = await start_apps(2)
    async with api_of(apps[0], settings) as first, api_of(apps[1], settings) as second:
        fleet = await make_fleet(first, settings, tmp_path, 6, prefix())
        consumers = await wait_for_consumers(settings.broker, 2)
        load = Load([first, second], fleet.ids, total=300, workers=6, pause_s=0.01, work_ms=20)
        async with fleet.running():
            await load.run()
            settle_s = await wait_all_final(dsn, list(load.accepted))
            await report(
                "two app processes consuming the same queues",
                load,
                dsn,
                settle_s,
                [f"consumers per queue: {consumers}; tasks created through both APIs alternately"],
            )
    outcome = await audit(dsn, load)
    # No fault: each task handed out exactly once, and succeeded.
    assert outcome.handed_out == len(load.accepted)
    assert outcome.statuses == {"succeeded": len(load.accepted)}
