"""Raw limits on the same box in the same run: the ceilings the app is compared with.

- PostgreSQL: single-statement INSERT (autocommit: one commit each) of a task row into the real
  `tasks` table (its indexes and audit trigger included) from `concurrency` asyncpg connections.
- RabbitMQ: publishes to `amq.topic` with publisher confirms (mandatory, persistent), `in_flight`
  unconfirmed at a time, through the `ConfirmedPublisher` the notifier uses (aiormq directly: the
  cheapest confirmed publish the app has). Nobody subscribes to the topic, so each comes back as
  unroutable, like a notice to an offline device.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg

from app.broker import ConfirmedPublisher, Outgoing
from app.settings import Settings
from bench.progress import Progress

RAW_DEVICE = "bench-raw"
_INSERT = """
INSERT INTO tasks (id, device_id, method, params, status, priority, attempt, max_attempts, timeout_s, version,
                   created_at, updated_at, notice_due_at)
VALUES ($1, $2, 'echo', $3, 'queued', 0, 0, 3, 300, 1, now(), now(), now())
"""


async def database_ceiling(dsn: str, concurrency: int, duration_s: float, progress: Progress) -> dict[str, Any]:
    setup = await asyncpg.connect(dsn)
    try:
        await setup.execute("INSERT INTO devices (id) VALUES ($1) ON CONFLICT DO NOTHING", RAW_DEVICE)
    finally:
        await setup.close()
    done = 0
    params = '{"n": 1, "payload": "a task-sized parameter object"}'

    async def insert_loop(stop_at: float) -> None:
        nonlocal done
        conn = await asyncpg.connect(dsn)
        try:
            while time.monotonic() < stop_at:
                await conn.execute(_INSERT, uuid.uuid4(), RAW_DEVICE, params)
                done += 1
        finally:
            await conn.close()

    started = time.monotonic()
    async with progress.ticking("raw", lambda: f"postgres: {done} inserts+commits"):
        await asyncio.gather(*(insert_loop(started + duration_s) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return {"concurrency": concurrency, "inserts": done, "per_s": round(done / elapsed, 1)}


async def broker_ceiling(settings: Settings, in_flight: int, duration_s: float, progress: Progress) -> dict[str, Any]:
    publisher = ConfirmedPublisher(settings.broker)
    await publisher.connect()
    done = 0
    failed = 0

    async def publish_loop(stop_at: float) -> None:
        nonlocal done, failed
        body = b'{"event":"task_queued","task_id":"00000000-0000-0000-0000-000000000000"}'
        while time.monotonic() < stop_at:
            try:
                await publisher.publish(Outgoing(f"dev/{RAW_DEVICE}/down/notify", body, message_id=str(uuid.uuid4())))
                done += 1
            except Exception:  # a publish not confirmed counts as failed, the run goes on
                failed += 1

    started = time.monotonic()
    try:
        async with progress.ticking("raw", lambda: f"rabbitmq: {done} confirmed publishes"):
            await asyncio.gather(*(publish_loop(started + duration_s) for _ in range(in_flight)))
        elapsed = time.monotonic() - started
    finally:
        await publisher.close()
    return {"in_flight": in_flight, "published": done, "failed": failed, "per_s": round(done / elapsed, 1)}
