"""What the lifecycle trigger costs the device's hot path: the claim (`tasks/next`) and the result,
each one statement, timed through the repository on a scratch database just before the
trigger's migration and at head (trigger `tasks_lifecycle`), alternately, several rounds; and at head the
time of each trigger per row, as EXPLAIN ANALYZE reports it for one UPDATE of all the tasks.

    set -a; . .run/<stack>/app.env; set +a
    .venv/bin/python -m bench.lifecycle_trigger [--tasks 2000] [--rounds 3]

The database is the stack's PostgreSQL (database swarm_bench_lifecycle, dropped at the end).
At the baseline the statements leave `version` unchanged; writing `version + 1` by hand there
would add one expression per row, which is not what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

import asyncpg
from alembic.config import Config
from sqlalchemy.engine import make_url

from alembic import command
from app.db import autocommit, create_engine, create_sessionmaker
from app.settings import Settings
from app.tasks import repository as repo
from swarm_device.protocol import TaskStatus

DATABASE = "swarm_bench_lifecycle"
# The revision before the lifecycle trigger.
BASELINE = "5c1f0a9d7e52-1"


def _migrate(url: str, step: str, revision: str) -> None:
    config = Config("alembic.ini")
    config.attributes["database_url"] = url
    config.attributes["configure_logger"] = False
    getattr(command, step)(config, revision)


async def _fill(dsn: str, tasks: int) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        devices = [f"bench-lc-{uuid.uuid4().hex[:12]}" for _ in range(tasks)]
        await conn.execute("INSERT INTO devices (id) SELECT unnest($1::text[])", devices)
        await conn.execute(
            "INSERT INTO tasks (id, device_id, method, params, max_attempts, timeout_s) "
            "SELECT gen_random_uuid(), d, 'echo', '{}', 3, 300 FROM unnest($1::text[]) AS d",
            devices,
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return devices


async def _round(settings: Settings, devices: list[str]) -> tuple[float, float]:
    """Microseconds per claim and per result, one device after another on one connection."""
    engine = create_engine(settings.database)
    sessions = create_sessionmaker(engine)
    claim_s = result_s = 0.0
    try:
        async with sessions() as session:
            await autocommit(session)
            for device_id in devices:
                started = time.perf_counter()
                task = await repo.current_or_claim(session, device_id)
                claimed = time.perf_counter()
                assert task is not None
                await repo.finish_in_progress(session, device_id, task.id, TaskStatus.SUCCEEDED, {"ok": True}, None)
                claim_s += claimed - started
                result_s += time.perf_counter() - claimed
    finally:
        await engine.dispose()
    return claim_s / len(devices) * 1e6, result_s / len(devices) * 1e6


async def _trigger_times(dsn: str, tasks: int) -> dict[str, float]:
    """Microseconds per row that each trigger of `tasks` took in one multi-row claim and one
    multi-row result (EXPLAIN ANALYZE reports the time of every trigger)."""
    devices = await _fill(dsn, tasks)
    conn = await asyncpg.connect(dsn)
    per_row: dict[str, float] = {}
    try:
        for step, sql in (
            (
                "claim",
                "UPDATE tasks SET status = 'in_progress', attempt = attempt + 1, started_at = now(), "
                "deadline_at = now() + interval '5 minutes', updated_at = now() WHERE device_id = ANY($1::text[])",
            ),
            (
                "result",
                "UPDATE tasks SET status = 'succeeded', result = '{\"ok\": true}', finished_at = now(), "
                "deadline_at = NULL, updated_at = now() WHERE device_id = ANY($1::text[])",
            ),
        ):
            plan = json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", devices))[0]
            per_row[f"{step} statement"] = plan["Execution Time"] * 1000 / tasks
            for trigger in plan["Triggers"]:
                per_row[f"{step} {trigger['Trigger Name']}"] = trigger["Time"] * 1000 / trigger["Calls"]
    finally:
        await conn.close()
    return per_row


async def main(tasks: int, rounds: int) -> None:
    stack = Settings()
    url = make_url(stack.database.url.get_secret_value()).set(database=DATABASE)
    admin = await asyncpg.connect(
        url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    )
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    settings = Settings(database={"url": url.render_as_string(hide_password=False)})
    figures: dict[str, list[tuple[float, float]]] = {"baseline": [], "head": []}
    triggers: list[dict[str, float]] = []
    try:
        for _ in range(rounds):
            for revision in ("baseline", "head"):
                await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
                await admin.execute(f'CREATE DATABASE "{DATABASE}"')
                target = BASELINE if revision == "baseline" else "head"
                await asyncio.to_thread(_migrate, url.render_as_string(hide_password=False), "upgrade", target)
                devices = await _fill(dsn, tasks)
                figures[revision].append(await _round(settings, devices))
                if revision == "head":
                    triggers.append(await _trigger_times(dsn, tasks))
        await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    finally:
        await admin.close()
    print(f"{tasks} tasks x {rounds} rounds, microseconds per statement (median of rounds; all rounds)")
    for revision, rows in figures.items():
        claims = [round(c) for c, _ in rows]
        results = [round(r) for _, r in rows]
        print(
            f"  {revision:8}  claim {statistics.median(claims):6.0f} {claims}"
            f"   result {statistics.median(results):6.0f} {results}"
        )
    print("at head, one UPDATE of all the tasks: microseconds per row (median of rounds)")
    for name in triggers[0]:
        print(f"  {name:36} {statistics.median(t[name] for t in triggers):7.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.tasks, args.rounds))
