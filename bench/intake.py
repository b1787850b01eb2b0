"""Intake: concurrent clients POST tasks as fast as the app answers (closed loop).

Persisted: 201 answers per second (each one committed before it was answered). Noticed: tasks
per second counted until the last of them has its notice confirmed by the broker
(`notice_due_at` cleared by the notifier), so a notifier that falls behind shows here.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import orjson

from bench.fleet import insert_devices
from bench.http import HttpConnection
from bench.progress import Progress, percentiles_ms

PREFIX = "bi-"
NOTICE_WAIT_S = 120.0


async def run(
    base_port: int,
    dsn: str,
    *,
    devices: int,
    concurrency: int,
    duration_s: float,
    headers: dict[str, str],
    progress: Progress,
) -> dict[str, Any]:
    await insert_devices(dsn, PREFIX, devices)
    created = 0
    errors: dict[int, int] = {}
    latencies: list[float] = []

    async def client(number: int, stop_at: float) -> None:
        nonlocal created
        conn = HttpConnection("127.0.0.1", base_port, headers)
        n = number
        try:
            while time.monotonic() < stop_at:
                device = f"{PREFIX}{n % devices + 1}"
                n += concurrency
                sent = time.perf_counter()
                status, _ = await conn.post_json(f"/api/v1/devices/{device}/tasks", {"method": "echo", "params": {}})
                latencies.append(time.perf_counter() - sent)
                if status == 201:
                    created += 1
                else:
                    errors[status] = errors.get(status, 0) + 1
        finally:
            await conn.close()

    started = time.monotonic()
    async with progress.ticking("intake", lambda: f"{created} tasks created, errors {errors or 0}"):
        await asyncio.gather(*(client(i, started + duration_s) for i in range(concurrency)))
    persisted_s = time.monotonic() - started
    noticed_s = await _until_all_noticed(dsn, started, progress)
    return {
        "concurrency": concurrency,
        "devices": devices,
        "created": created,
        "errors": errors,
        "persisted_per_s": round(created / persisted_s, 1),
        "noticed_per_s": round(created / noticed_s, 1) if noticed_s else 0.0,
        "all_noticed_after_s": round(noticed_s, 2) if noticed_s else None,
        "answer_latency_ms": percentiles_ms(latencies),
    }


async def _until_all_noticed(dsn: str, started: float, progress: Progress) -> float | None:
    """Seconds from the start until no task waits for its notice; None if that never happened."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + NOTICE_WAIT_S
        polls = 0
        while time.monotonic() < deadline:
            due = await conn.fetchval("SELECT count(*) FROM tasks WHERE notice_due_at IS NOT NULL")
            if due == 0:
                return time.monotonic() - started
            polls += 1
            if polls % 8 == 0:
                progress.say("intake", f"{due} notices still unconfirmed")
            await asyncio.sleep(0.25)
        return None
    finally:
        await conn.close()


async def run_batch(
    base_port: int,
    dsn: str,
    *,
    devices: int,
    clients: int,
    duration_s: float,
    headers: dict[str, str],
    progress: Progress,
) -> dict[str, Any]:
    """POST /tasks/batch, one task for each of the intake devices per batch, `clients` at a time."""
    device_ids = [f"{PREFIX}{n}" for n in range(1, devices + 1)]
    created = 0
    errors: dict[int, int] = {}
    latencies: list[float] = []

    async def client(stop_at: float) -> None:
        nonlocal created
        conn = HttpConnection("127.0.0.1", base_port, headers)
        try:
            while time.monotonic() < stop_at:
                sent = time.perf_counter()
                status, body = await conn.post_json(
                    "/api/v1/tasks/batch", {"method": "echo", "params": {}, "device_ids": device_ids}
                )
                latencies.append(time.perf_counter() - sent)
                if status == 201:
                    created += orjson.loads(body)["task_count"]
                else:
                    errors[status] = errors.get(status, 0) + 1
        finally:
            await conn.close()

    started = time.monotonic()
    async with progress.ticking("batch", lambda: f"{created} tasks created in batches of {devices}"):
        await asyncio.gather(*(client(started + duration_s) for _ in range(clients)))
    persisted_s = time.monotonic() - started
    noticed_s = await _until_all_noticed(dsn, started, progress)
    return {
        "measured": True,
        "batch_size": devices,
        "clients": clients,
        "created": created,
        "errors": errors,
        "persisted_per_s": round(created / persisted_s, 1),
        "noticed_per_s": round(created / noticed_s, 1) if noticed_s else 0.0,
        "answer_latency_ms": percentiles_ms(latencies),
    }
