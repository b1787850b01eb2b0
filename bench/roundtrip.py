"""Round trip: connected simulated TLS devices run no-op (`echo`) tasks offered at a fixed rate.

Open loop: a task is POSTed every 1/rate seconds whatever the answers do, spread over the devices.
Latency is from just before the POST (harness clock) to the task's `finished_at` (the app's clock;
the same machine), i.e. POST, commit, notice, `tasks/next`, execution, result, commit.

CPU per task: the CPU time each part of the system used from the first POST until the last task
was final, divided by the tasks done. On a shared, busy machine latency says more about the
neighbours than about the code; CPU per task does not, and 2 cores / (sum of CPU per task) is the
rate this box could carry if nothing else ran on it.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from app.settings import Settings
from bench.env import CpuMeter, Stack
from bench.fleet import Fleet, purge_queues
from bench.http import HttpConnection
from bench.progress import Progress, percentiles_ms
from bench.simulator import Simulator, simulating

FINAL_WAIT_S = 30.0
MAX_CONNECTIONS = 256


async def wait_ready(simulator: Simulator, count: int, timeout_s: float, section: str, progress: Progress) -> None:
    deadline = time.monotonic() + timeout_s
    async with progress.ticking(section, lambda: f"{simulator.connected} connected, {simulator.ready} ready"):
        while simulator.ready < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {simulator.ready} of {count} simulated devices became ready")
            simulator.check_running()
            await asyncio.sleep(0.2)


def cpu_report(used: dict[str, float], tasks: int, wall_s: float) -> dict[str, Any]:
    return {
        "wall_s": round(wall_s, 1),
        "load_average": os.getloadavg()[0],
        "cores_used": {part: round(seconds / wall_s, 2) for part, seconds in used.items()},
        "ms_per_task": {part: round(seconds * 1000 / max(tasks, 1), 2) for part, seconds in used.items()},
    }


async def run(
    settings: Settings,
    dsn: str,
    fleet: Fleet,
    *,
    stack: Stack,
    app_pids: list[int],
    app_port: int,
    devices: int,
    rate: float,
    duration_s: float,
    headers: dict[str, str],
    log_file: Path,
    progress: Progress,
    ask_next: bool = True,
) -> dict[str, Any]:
    # What the sections before left (intake's tasks of devices that never connect, and their
    # notices) would otherwise be worked off during this one.
    before = await settle(settings, dsn)
    async with simulating(
        settings, fleet, devices, connect_rate=300, log_file=log_file, ask_next=ask_next
    ) as simulator:
        await wait_ready(simulator, devices, devices / 100 + 60, "roundtrip", progress)
        progress.say("roundtrip", f"{devices} devices ready; offering {rate:g} tasks/s for {duration_s:g} s")
        meter, started = CpuMeter(stack, app_pids, simulator.pids), time.monotonic()
        figures = await round_trips(dsn, app_port, fleet.ids(devices), rate, duration_s, headers, progress)
        cpu = cpu_report(meter.used(), figures["completed"], time.monotonic() - started)
    left = await settle(settings, dsn)
    return {
        "devices": devices,
        "ask_next": ask_next,
        "offered_per_s": rate,
        "duration_s": duration_s,
        **figures,
        "cpu": cpu,
        "left_by_earlier_sections": before,
        "left_for_next_section": left,
    }


def _span(sent_at: dict[uuid.UUID, float], finished: dict[uuid.UUID, float]) -> float:
    if not finished:
        return 1.0
    return max(max(finished.values()) - min(sent_at.values()), 1e-3)


async def settle(settings: Settings, dsn: str) -> dict[str, int]:
    """Leave nothing to the next section: an overloaded round trip's unfinished tasks would run
    their deadlines and re-sends, and its queued requests would be worked off, during it. The
    unfinished tasks are canceled in SQL (their devices are gone; nobody needs the notice), then
    the app's queues are purged."""
    conn = await asyncpg.connect(dsn)
    try:
        canceled = await conn.fetchval(
            """
            WITH canceled AS (
                UPDATE tasks SET status = 'canceled', version = version + 1, updated_at = now(),
                                 finished_at = now(), deadline_at = NULL, notice_due_at = NULL
                WHERE finished_at IS NULL RETURNING 1
            ) SELECT count(*) FROM canceled
            """
        )
    finally:
        await conn.close()
    return {"tasks_canceled": canceled, "messages_purged": await purge_queues(settings)}


async def round_trips(
    dsn: str, app_port: int, ids: list[str], rate: float, duration_s: float, headers: dict[str, str], progress: Progress
) -> dict[str, Any]:
    """Tasks offered to `ids` at `rate` for `duration_s`, and their latencies once final."""
    sent_at, errors = await offer(app_port, ids, rate, duration_s, headers, progress)
    finished = await finished_at(dsn, list(sent_at), progress)
    latencies = [finished[task_id] - sent for task_id, sent in sent_at.items() if task_id in finished]
    return {
        "posted": len(sent_at),
        "post_errors": errors,
        "completed": len(latencies),
        "not_final_after_wait": len(sent_at) - len(latencies),
        # Over the time the work took (first POST to last final), not the offered window: an
        # overloaded round trip finishes its tasks long after the last POST.
        "achieved_per_s": round(len(latencies) / _span(sent_at, finished), 1),
        "latency_ms": percentiles_ms(latencies),
    }


async def offer(
    app_port: int, ids: list[str], rate: float, duration_s: float, headers: dict[str, str], progress: Progress
) -> tuple[dict[uuid.UUID, float], int]:
    idle: list[HttpConnection] = []
    opened: list[HttpConnection] = []
    sent_at: dict[uuid.UUID, float] = {}
    errors = 0

    async def post(device_id: str) -> None:
        nonlocal errors
        conn = idle.pop() if idle else None
        if conn is None:
            if len(opened) >= MAX_CONNECTIONS:
                errors += 1  # the app is so far behind that the offered rate cannot be kept
                return
            conn = HttpConnection("127.0.0.1", app_port, headers)
            opened.append(conn)
        sent = time.time()
        try:
            status, body = await conn.post_json(f"/api/v1/devices/{device_id}/tasks", {"method": "echo", "params": {}})
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
            await conn.close()
            opened.remove(conn)
            return
        idle.append(conn)
        if status == 201:
            sent_at[uuid.UUID(orjson.loads(body)["id"])] = sent
        else:
            errors += 1

    total = int(rate * duration_s)
    pending: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with progress.ticking("roundtrip", lambda: f"{len(sent_at)} of {total} tasks posted"):
        for n in range(total):
            delay = started + n / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(post(ids[n % len(ids)]))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending)
    for conn in opened:
        await conn.close()
    return sent_at, errors


async def finished_at(dsn: str, task_ids: list[uuid.UUID], progress: Progress) -> dict[uuid.UUID, float]:
    """finished_at (epoch seconds) of the tasks that became final, waiting up to FINAL_WAIT_S for the rest."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + FINAL_WAIT_S
        while True:
            rows = await conn.fetch(
                "SELECT id, finished_at FROM tasks WHERE id = ANY($1::uuid[]) AND finished_at IS NOT NULL", task_ids
            )
            if len(rows) == len(task_ids) or time.monotonic() > deadline:
                return {row["id"]: row["finished_at"].timestamp() for row in rows}
            progress.say("roundtrip", f"{len(task_ids) - len(rows)} tasks not final yet")
            await asyncio.sleep(1.0)
    finally:
        await conn.close()
