"""Scale: `tasks/next` latency with an empty database, then with many devices and stored tasks.

A probe device (real TLS MQTT, the SDK's `DeviceClient`) calls `tasks/next` one call after the
other and has nothing pending, so each call runs the whole pull (its in-progress lookup and the
one-statement claim) and answers null. The bulk load is generated inside PostgreSQL: devices
`bs-N`, each with ten tasks, nine finished and one queued; the audit trigger writes their events.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from app.settings import Settings
from bench.fleet import Fleet
from bench.progress import Progress, percentiles_ms
from swarm_device.client import DeviceClient
from swarm_device.protocol import METHOD_TASKS_NEXT

PREFIX = "bs-"
TASKS_PER_DEVICE = 10
LOAD_CHUNK_DEVICES = 10_000
_LOAD_TASKS = """
INSERT INTO tasks (id, device_id, method, params, status, priority, attempt, max_attempts, timeout_s, version,
                   created_at, updated_at, started_at, finished_at, result)
SELECT gen_random_uuid(), $1 || d, 'echo', '{}', CASE WHEN k = 0 THEN 'queued' ELSE 'succeeded' END,
       0, CASE WHEN k = 0 THEN 0 ELSE 1 END, 3, 300, 1,
       now() - (k || ' minutes')::interval, now(), CASE WHEN k = 0 THEN NULL ELSE now() END,
       CASE WHEN k = 0 THEN NULL ELSE now() END, CASE WHEN k = 0 THEN NULL ELSE '{}'::jsonb END
FROM generate_series($2::int, $3::int) AS d, generate_series(0, $4::int - 1) AS k
"""


async def pull_latency(settings: Settings, fleet: Fleet, device_id: str, calls: int) -> dict[str, float]:
    """`tasks/next` round trips of one device, one after the other."""
    client = DeviceClient(
        device_id,
        settings.broker.mqtt_host,
        settings.broker.mqtt_port,
        settings.pki.ca_cert_file,
        fleet.cert_dir / f"{device_id}.crt",
        fleet.cert_dir / f"{device_id}.key",
        protocol="3.1.1",
    )
    samples: list[float] = []
    async with client:
        await client.ready.wait()
        for _ in range(calls + 10):
            started = time.perf_counter()
            await client.call(METHOD_TASKS_NEXT)
            samples.append(time.perf_counter() - started)
    return percentiles_ms(samples[10:])  # the first calls warm caches and the connection


async def load(dsn: str, devices: int, progress: Progress) -> dict[str, Any]:
    """Insert `devices` devices with TASKS_PER_DEVICE tasks each; returns the table sizes."""
    conn = await asyncpg.connect(dsn, command_timeout=None)
    started = time.monotonic()
    try:
        await conn.execute(
            "INSERT INTO devices (id) SELECT $1 || n FROM generate_series(1, $2::int) AS n", PREFIX, devices
        )
        for first in range(1, devices + 1, LOAD_CHUNK_DEVICES):
            last = min(devices, first + LOAD_CHUNK_DEVICES - 1)
            await conn.execute(_LOAD_TASKS, PREFIX, first, last, TASKS_PER_DEVICE)
            progress.say("scale", f"loaded {last * TASKS_PER_DEVICE} of {devices * TASKS_PER_DEVICE} tasks")
        await conn.execute("ANALYZE devices; ANALYZE tasks; ANALYZE task_events")
        stored_tasks = await conn.fetchval("SELECT count(*) FROM tasks")
        stored_devices = await conn.fetchval("SELECT count(*) FROM devices")
    finally:
        await conn.close()
    return {
        "devices": stored_devices,
        "tasks": stored_tasks,
        "load_s": round(time.monotonic() - started, 1),
    }
