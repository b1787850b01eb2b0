"""Scale: `tasks/next` latency with an empty database, then with many devices and stored tasks.

A probe device (real TLS MQTT, the SDK's `DeviceClient`) calls `tasks/next` one call after the
other and has nothing pending, so each call runs the whole pull (its in-progress lookup and the
one-statement claim) and answers null. The bulk load is generated inside PostgreSQL: devices
`bs-N`, each with `TASKS_PER_DEVICE` tasks spread over the last 30 days: most final, about 4% of
them queued or sent and one device in 50 with a task in progress; every task has its audit
history (one event per version, as the trigger would have written them). The probe gets a history
of final tasks too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from app.settings import Settings
from bench.fleet import Fleet
from bench.progress import Progress, percentiles_ms
from swarm_device.client import DeviceClient
from swarm_device.protocol import METHOD_TASKS_NEXT
from swarm_device.rpc import REQUESTS_PER_S

PREFIX = "bs-"
TASKS_PER_DEVICE = 10
LOAD_CHUNK_DEVICES = 10_000
# The first calls warm the app's caches, its pool and the connection.
WARM_UP_CALLS = 50
# The probe connects and says hello before its calls are timed.
READY_TIMEOUT_S = 60.0
# Loaded devices whose number gives them a queued task (n % 5 == 0), and a task in progress and a
# queued one (n % 50 == 0): see _LOAD_TASKS.
PENDING_DEVICE = f"{PREFIX}5"
IN_PROGRESS_DEVICE = f"{PREFIX}50"

_LOAD_DEVICES = """
INSERT INTO devices (id, firmware, model, capabilities, hello_at, last_seen_at, created_at, updated_at)
SELECT $1 || n, 'fw-' || (n % 7), 'model-' || (n % 3), '["echo", "reboot"]'::jsonb,
       now() - (n % 1440) * interval '1 minute', now() - (n % 1440) * interval '1 minute',
       now() - interval '90 days', now()
FROM generate_series(1, $2::int) AS n
"""

# One statement per chunk: the tasks, then their events from what the INSERT returned. Statuses
# follow the device number n and the task number k: pending tasks only when $3 allows them.
_LOAD_TASKS = """
WITH planned AS (
    SELECT dev.id AS device_id, dev.n, k,
           CASE
               WHEN $3 AND k = 0 AND dev.n % 50 = 0 THEN 'in_progress'
               WHEN $3 AND k = 1 AND dev.n % 5 = 0 THEN 'queued'
               WHEN $3 AND k = 1 AND dev.n % 5 = 1 THEN 'sent'
               WHEN (dev.n * 7 + k) % 100 < 90 THEN 'succeeded'
               WHEN (dev.n * 7 + k) % 100 < 95 THEN 'failed'
               WHEN (dev.n * 7 + k) % 100 < 97 THEN 'timed_out'
               WHEN (dev.n * 7 + k) % 100 < 99 THEN 'expired'
               ELSE 'canceled'
           END AS status,
           now() - random() * interval '30 days' AS created_at
    FROM unnest($1::text[]) WITH ORDINALITY AS dev(id, n), generate_series(0, $2::int - 1) AS k
),
shaped AS (
    SELECT p.*,
           CASE status WHEN 'queued' THEN 1 WHEN 'sent' THEN 2 WHEN 'in_progress' THEN 3
                       WHEN 'expired' THEN 2 WHEN 'canceled' THEN 2 ELSE 4 END AS version,
           status IN ('in_progress', 'succeeded', 'failed', 'timed_out') AS ran,
           status IN ('succeeded', 'failed', 'timed_out', 'expired', 'canceled') AS final
    FROM planned p
),
inserted AS (
    INSERT INTO tasks (id, device_id, method, params, status, priority, attempt, max_attempts, timeout_s,
                       version, expires_at, deadline_at, sent_at, started_at, finished_at, result, error,
                       created_at, updated_at)
    SELECT gen_random_uuid(), device_id, (ARRAY['echo', 'reboot', 'config.apply', 'firmware.update'])[1 + (n + k) % 4],
           jsonb_build_object('k', k), status, (k % 3 = 0)::int, ran::int, 3, 300,
           version,
           CASE WHEN status IN ('queued', 'sent') AND n % 3 = 0 THEN now() + interval '1 day' END,
           -- In-progress tasks are well inside their deadline: the deadline job has nothing to do.
           CASE WHEN status = 'in_progress' THEN now() + interval '1 hour' END,
           CASE WHEN version >= 2 THEN created_at + interval '1 second' END,
           CASE WHEN ran THEN created_at + interval '2 seconds' END,
           CASE WHEN final THEN created_at + interval '3 seconds' END,
           CASE WHEN status = 'succeeded' THEN '{"ok": true}'::jsonb END,
           CASE WHEN status IN ('failed', 'timed_out') THEN '{"message": "simulated"}'::jsonb END,
           created_at,
           created_at + version * interval '1 second'
    FROM shaped
    RETURNING id, status, version, attempt, result, error, created_at
)
INSERT INTO task_events (task_id, version, status, attempt, details, created_at)
SELECT t.id, v,
       CASE WHEN v = t.version THEN t.status ELSE (ARRAY['queued', 'sent', 'in_progress'])[v] END,
       CASE WHEN v >= 3 THEN t.attempt ELSE 0 END,
       CASE WHEN v = t.version
            THEN NULLIF(jsonb_strip_nulls(jsonb_build_object('result', t.result, 'error', t.error)), '{}'::jsonb) END,
       t.created_at + (v - 1) * interval '1 second'
FROM inserted t, generate_series(1, t.version) AS v
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
    )
    samples: list[float] = []
    async with client:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await client.ready.wait()
        for _ in range(calls + WARM_UP_CALLS):
            # The SDK's own pace (decision 46): never a wait inside the timed call.
            await asyncio.sleep(1 / REQUESTS_PER_S)
            started = time.perf_counter()
            await client.call(METHOD_TASKS_NEXT)
            samples.append(time.perf_counter() - started)
    return percentiles_ms(samples[WARM_UP_CALLS:])


# What writes task events: on INSERT per statement, on UPDATE per row (the baseline migration).
AUDIT_TRIGGERS = ("tasks_record_inserted", "tasks_record_event")


async def _load_tasks(conn: asyncpg.Connection, device_ids: list[str], pending: bool) -> None:
    # The audit triggers are off for the chunk (inside its transaction: the app waits on the
    # table meanwhile and never sees them off) because the same statement writes the whole history.
    async with conn.transaction():
        for trigger in AUDIT_TRIGGERS:
            await conn.execute(f"ALTER TABLE tasks DISABLE TRIGGER {trigger}")
        await conn.execute(_LOAD_TASKS, device_ids, TASKS_PER_DEVICE, pending)
        for trigger in AUDIT_TRIGGERS:
            await conn.execute(f"ALTER TABLE tasks ENABLE TRIGGER {trigger}")


async def load(dsn: str, devices: int, history_of: str, progress: Progress) -> dict[str, Any]:
    """Insert `devices` devices with TASKS_PER_DEVICE tasks each, and a history of final tasks for
    the device `history_of`; returns the table sizes."""
    # JIT would compile the generating statements again for every chunk (~1.5 s each).
    conn = await asyncpg.connect(dsn, command_timeout=None, server_settings={"jit": "off"})
    started = time.monotonic()
    try:
        await conn.execute(_LOAD_DEVICES, PREFIX, devices)
        for first in range(1, devices + 1, LOAD_CHUNK_DEVICES):
            last = min(devices, first + LOAD_CHUNK_DEVICES - 1)
            await _load_tasks(conn, [f"{PREFIX}{n}" for n in range(first, last + 1)], pending=True)
            progress.say("scale", f"loaded {last * TASKS_PER_DEVICE:,} of {devices * TASKS_PER_DEVICE:,} tasks")
        await _load_tasks(conn, [history_of], pending=False)
        loaded_s = time.monotonic() - started
        # A database in service is vacuumed and analysed: index-only scans and fresh statistics.
        progress.say("scale", "VACUUM ANALYZE")
        await conn.execute("VACUUM ANALYZE devices, tasks, task_events")
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM devices) AS devices, (SELECT count(*) FROM tasks) AS tasks,"
            " (SELECT count(*) FROM task_events) AS events,"
            " (SELECT count(*) FROM tasks WHERE status IN ('queued', 'sent', 'in_progress')) AS pending"
        )
    finally:
        await conn.close()
    return {
        **dict(counts),
        "load_s": round(loaded_s, 1),
        "vacuum_s": round(time.monotonic() - started - loaded_s, 1),
    }
