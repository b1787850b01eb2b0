"""Intake: concurrent clients POST tasks as fast as the app answers (closed loop).

Persisted: 201 answers per second (each one committed before it was answered). Noticed: tasks
per second counted until the last of them has its notice confirmed by the broker
(`notice_due_at` cleared by the notifier), so a notifier that falls behind shows here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from app.settings import Settings
from bench.env import cpu_seconds
from bench.fleet import insert_devices, provision_broker_users
from bench.http import HttpConnection
from bench.progress import Progress, percentiles_ms

PREFIX = "bi-"
NOTICE_WAIT_S = 120.0


@dataclass
class Tally:
    """What closed-loop clients saw: items counted from 2xx answers, other statuses, latencies."""

    counted: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)


# One request of a client: (connection, client number, its request count) -> (status, body).
Exchange = Callable[[HttpConnection, int, int], Awaitable[tuple[int, bytes]]]


async def closed_loop(
    base_port: int,
    headers: dict[str, str],
    clients: int,
    duration_s: float,
    exchange: Exchange,
    count: Callable[[bytes], int],
    tally: Tally,
) -> float:
    """`clients` keep-alive clients, each sending its next request when the last was answered,
    for `duration_s`; returns the seconds it took."""

    async def client(number: int, stop_at: float) -> None:
        conn = HttpConnection("127.0.0.1", base_port, headers)
        sent_count = 0
        try:
            while time.monotonic() < stop_at:
                sent = time.perf_counter()
                status, body = await exchange(conn, number, sent_count)
                tally.latencies.append(time.perf_counter() - sent)
                sent_count += 1
                if 200 <= status < 300:
                    tally.counted += count(body)
                else:
                    tally.errors[status] = tally.errors.get(status, 0) + 1
        finally:
            await conn.close()

    started = time.monotonic()
    await asyncio.gather(*(client(i, started + duration_s) for i in range(clients)))
    return time.monotonic() - started


async def prepare(settings: Settings, dsn: str, devices: int) -> None:
    """The intake devices' rows and broker users, before the app starts: else the app's start-up
    reconciliation would provision 1,000 broker users, call by call, while intake is measured."""
    await insert_devices(dsn, PREFIX, devices)
    await provision_broker_users(settings, [f"{PREFIX}{n}" for n in range(1, devices + 1)])


async def run(
    base_port: int,
    dsn: str,
    *,
    devices: int,
    concurrency: int,
    duration_s: float,
    headers: dict[str, str],
    app_pids: list[int],
    progress: Progress,
) -> dict[str, Any]:
    """Intake on the devices that `prepare` made."""
    tally = Tally()

    def create(conn: HttpConnection, number: int, sent: int) -> Awaitable[tuple[int, bytes]]:
        device = f"{PREFIX}{(number + sent * concurrency) % devices + 1}"
        return conn.post_json(f"/api/v1/devices/{device}/tasks", {"method": "echo", "params": {}})

    started = time.monotonic()
    cpu_before = cpu_seconds(app_pids)
    async with progress.ticking("intake", lambda: f"{tally.counted} tasks created, errors {tally.errors or 0}"):
        persisted_s = await closed_loop(base_port, headers, concurrency, duration_s, create, lambda _: 1, tally)
    app_cpu_s = cpu_seconds(app_pids) - cpu_before
    noticed_s = await _until_all_noticed(dsn, started, progress)
    return {
        "concurrency": concurrency,
        "devices": devices,
        "created": tally.counted,
        "errors": tally.errors,
        "persisted_per_s": round(tally.counted / persisted_s, 1),
        "noticed_per_s": round(tally.counted / noticed_s, 1) if noticed_s else 0.0,
        "all_noticed_after_s": round(noticed_s, 2) if noticed_s else None,
        "answer_latency_ms": percentiles_ms(tally.latencies),
        "app_cpu_ms_per_task": _per_answer_ms(app_cpu_s, tally),
    }


def _per_answer_ms(cpu_s: float, tally: Tally) -> float | None:
    """CPU per answered request: less noisy than a rate on a shared box (all the app's processes,
    its background work during the loop included)."""
    answered = tally.counted + sum(tally.errors.values())
    return round(cpu_s * 1000 / answered, 3) if answered else None


async def http_floor(
    base_port: int,
    *,
    concurrency: int,
    duration_s: float,
    headers: dict[str, str],
    app_pids: list[int],
    progress: Progress,
) -> dict[str, Any]:
    """The same clients against the liveness probe (no database, no broker): what the HTTP stack
    alone answers on this box with these workers, the most intake could reach."""
    tally = Tally()

    def probe(conn: HttpConnection, _number: int, _sent: int) -> Awaitable[tuple[int, bytes]]:
        return conn.get("/healthz")

    cpu_before = cpu_seconds(app_pids)
    async with progress.ticking("intake", lambda: f"HTTP floor: {tally.counted} GET /healthz answered"):
        elapsed = await closed_loop(base_port, headers, concurrency, duration_s, probe, lambda _: 1, tally)
    app_cpu_s = cpu_seconds(app_pids) - cpu_before
    return {
        "concurrency": concurrency,
        "answered": tally.counted,
        "errors": tally.errors,
        "per_s": round(tally.counted / elapsed, 1),
        "answer_latency_ms": percentiles_ms(tally.latencies),
        "app_cpu_ms_per_request": _per_answer_ms(app_cpu_s, tally),
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
    body = {"method": "echo", "params": {}, "device_ids": [f"{PREFIX}{n}" for n in range(1, devices + 1)]}
    tally = Tally()

    def create(conn: HttpConnection, _number: int, _sent: int) -> Awaitable[tuple[int, bytes]]:
        return conn.post_json("/api/v1/tasks/batch", body)

    def task_count(answer: bytes) -> int:
        return int(orjson.loads(answer)["task_count"])

    started = time.monotonic()
    async with progress.ticking("batch", lambda: f"{tally.counted} tasks created in batches of {devices}"):
        persisted_s = await closed_loop(base_port, headers, clients, duration_s, create, task_count, tally)
    noticed_s = await _until_all_noticed(dsn, started, progress)
    return {
        "measured": True,
        "batch_size": devices,
        "clients": clients,
        "created": tally.counted,
        "errors": tally.errors,
        "persisted_per_s": round(tally.counted / persisted_s, 1),
        "noticed_per_s": round(tally.counted / noticed_s, 1) if noticed_s else 0.0,
        "answer_latency_ms": percentiles_ms(tally.latencies),
    }
