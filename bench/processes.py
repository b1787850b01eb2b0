"""Processes: step transitions per second, on an empty database and with many stored instances.

A transition is one human step completed through the service (`advance_step`: the instance
locked, the step ended, the history written, the next step opened, one commit), in the bench
process itself: the engine and its storage, not HTTP. `concurrency` workers each drive their
own instance around a loop (`work` -again-> `work`). The same is measured again after
`loaded` running instances, each with an open step and its history, were stored in bulk.
The ratio is to the raw PostgreSQL INSERT+COMMIT rate of the same run (bench/raw.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import ANONYMOUS
from app.db import create_engine, create_sessionmaker
from app.processes import service
from app.processes.definition import Definition
from app.processes.models import ProcessStep
from app.processes.schemas import DefinitionCreate, InstanceCreate
from app.settings import Settings
from bench.progress import Progress, percentiles_ms

NAME = "bench-loop"
LOOP = Definition.model_validate(
    {
        "start": "work",
        "steps": {
            "work": {
                "kind": "human",
                "role": "operator",
                "outcomes": ["again", "stop"],
                "next": {"again": "work", "stop": "end"},
            },
            "end": {"kind": "end"},
        },
    }
)
LOAD_CHUNK = 50_000


async def run(
    settings: Settings, dsn: str, *, concurrency: int, duration_s: float, loaded: int, progress: Progress
) -> dict[str, Any]:
    engine = create_engine(settings.database.model_copy(update={"pool_size": concurrency + 2}))
    deps = service.Deps(create_sessionmaker(engine), settings)
    try:
        definition = await service.create_definition(deps, DefinitionCreate(name=NAME, definition=LOOP), ANONYMOUS)
        empty = await _transitions(deps, dsn, concurrency, duration_s, progress)
        progress.say("processes", f"storing {loaded:,} running instances")
        load_s = await _load(dsn, definition.id, loaded, progress)
        full = await _transitions(deps, dsn, concurrency, duration_s, progress)
    finally:
        await engine.dispose()
    return {
        "concurrency": concurrency,
        "empty": empty,
        "loaded_instances": loaded,
        "load_s": round(load_s, 1),
        "loaded": full,
        "loaded_change_pct": round((full["per_s"] / empty["per_s"] - 1) * 100, 1),
    }


async def _transitions(
    deps: service.Deps, dsn: str, concurrency: int, duration_s: float, progress: Progress
) -> dict[str, Any]:
    done = 0
    latencies: list[float] = []

    async def again(_d: Definition, _s: ProcessStep, _session: AsyncSession) -> tuple[str, dict[str, Any]]:
        return "again", {}

    async def worker(stop_at: float) -> None:
        nonlocal done
        instance = await service.start_instance(deps, InstanceCreate(definition=NAME))
        conn = await asyncpg.connect(dsn)
        try:
            while time.monotonic() < stop_at:
                step_id = await conn.fetchval(
                    "SELECT id FROM process_steps WHERE instance_id = $1 AND status = 'open'", instance.id
                )
                started = time.perf_counter()
                if await service.advance_step(deps, instance.id, step_id, again):
                    latencies.append(time.perf_counter() - started)
                    done += 1
        finally:
            await conn.close()

    started = time.monotonic()
    async with progress.ticking("processes", lambda: f"{done} transitions"):
        await asyncio.gather(*(worker(started + duration_s) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return {"transitions": done, "per_s": round(done / elapsed, 1), "latency_ms": percentiles_ms(latencies)}


async def _load(dsn: str, definition_id: uuid.UUID, count: int, progress: Progress) -> float:
    """`count` running instances of the loop, each with its open step and a history row, in
    bulk (generate_series), then ANALYZE."""
    conn = await asyncpg.connect(dsn)
    started = time.monotonic()
    try:
        stored = 0
        while stored < count:
            chunk = min(LOAD_CHUNK, count - stored)
            async with conn.transaction():
                await conn.execute(
                    """
CREATE TEMP TABLE bench_ids ON COMMIT DROP AS SELECT gen_random_uuid() AS id FROM generate_series(1, $1)""",
                    chunk,
                )
                await conn.execute(
                    """
INSERT INTO process_instances (id, definition_id, name, version, status, data)
SELECT id, $1, $2, 1, 'running', '{"input": {}, "steps": {}}'::jsonb FROM bench_ids""",
                    definition_id,
                    NAME,
                )
                await conn.execute(
                    """
INSERT INTO process_steps (instance_id, step, kind, status, role) SELECT id, 'work', 'human', 'open', 'operator'
FROM bench_ids"""
                )
                await conn.execute(
                    "INSERT INTO process_events (instance_id, type, step) "
                    "SELECT id, 'step.opened', 'work' FROM bench_ids"
                )
            stored += chunk
            progress.say("processes", f"{stored:,} of {count:,} instances stored")
        await conn.execute("ANALYZE process_instances, process_steps, process_events")
    finally:
        await conn.close()
    return time.monotonic() - started
