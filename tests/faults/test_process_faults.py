"""Processes survive kill -9: two apps advance instances (timers, through their jobs) while one
of them is killed and restarted twice; no instance is lost, stuck or advanced twice."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx
import pytest

from app.settings import Settings
from tests.faults.conftest import StartApps, api_of
from tests.polling import eventually

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

STEPS = 5
INSTANCES = 120


def chain(name: str) -> dict[str, object]:
    """STEPS timers one after the other, then the end: STEPS transitions by the jobs."""
    steps: dict[str, object] = {
        f"t{i}": {"kind": "timer", "wait_s": 0.3, "next": {"done": f"t{i + 1}" if i < STEPS else "end"}}
        for i in range(1, STEPS + 1)
    }
    return {"name": name, "definition": {"start": "t1", "steps": {**steps, "end": {"kind": "end"}}}}


async def start_all(apis: list[httpx.AsyncClient], name: str) -> list[str]:
    gate = asyncio.Semaphore(8)

    async def start(n: int) -> str:
        async with gate:
            response = await apis[n % len(apis)].post("/processes/instances", json={"definition": name})
            assert response.status_code == 201, response.text
            return str(response.json()["id"])

    return list(await asyncio.gather(*(start(n) for n in range(INSTANCES))))


async def test_kill_9_while_two_apps_advance_instances(start_apps: StartApps, settings: Settings, dsn: str) -> None:
    apps = await start_apps(2)
    name = f"chain-{uuid.uuid4().hex[:8]}"
    async with api_of(apps[0], settings) as first, api_of(apps[1], settings) as second:
        created = await first.post("/processes/definitions", json=chain(name))
        assert created.status_code == 201, created.text
        ids = await start_all([first, second], name)
    conn = await asyncpg.connect(dsn)
    try:

        async def all_ended() -> bool:
            query = "SELECT count(*) FROM process_instances WHERE name = $1 AND status = 'running'"
            return int(await conn.fetchval(query, name)) == 0

        for _ in range(2):
            # Killed while its jobs hold instance locks and transactions are open.
            await asyncio.sleep(1.0)
            await apps[0].kill()
            await asyncio.sleep(0.5)
            await apps[0].start()
        await eventually(all_ended, within_s=150, every_s=0.5)
        statuses = await conn.fetch(
            "SELECT status, result, count(*) AS n FROM process_instances WHERE name = $1 GROUP BY 1, 2", name
        )
        # Every waiting step of every instance ended once; each end is recorded once.
        steps = await conn.fetch(
            """
SELECT i.id, count(s.id) FILTER (WHERE s.status = 'done') AS done, count(s.id) AS rows,
       (SELECT count(*) FROM process_events e WHERE e.instance_id = i.id AND e.type = 'step.completed') AS ended
FROM process_instances i JOIN process_steps s ON s.instance_id = i.id
WHERE i.name = $1 GROUP BY i.id""",
            name,
        )
    finally:
        await conn.close()
    assert [(r["status"], r["result"], r["n"]) for r in statuses] == [("completed", "completed", INSTANCES)]
    assert sorted(str(r["id"]) for r in steps) == sorted(ids)
    assert {(r["done"], r["rows"], r["ended"]) for r in steps} == {(STEPS, STEPS, STEPS)}
