"""Raw limits on the same box in the same run: the ceilings the app is compared with.

- PostgreSQL: single-statement INSERT (autocommit: one commit each) of a task row into the real
  `tasks` table (its indexes and audit trigger included) from `concurrency` asyncpg connections.
- RabbitMQ: publishes to `amq.topic` with publisher confirms (mandatory, persistent), `in_flight`
  unconfirmed at a time, through the `ConfirmedPublisher` the notifier uses (aiormq directly: the
  cheapest confirmed publish the app has). Nobody subscribes to the topic, so each comes back as
  unroutable, like a notice to an offline device.
- The device round trip without the app: `bench.raw_devices` (bare MQTT 5 clients over TLS, one
  process) answer each notice with a `next` and a `result` request; one AMQP consumer here (aiormq,
  acks, replies and notices through `ConfirmedPublisher` as the app sends them) answers each request
  on its Response Topic and, after a `result`, sends the device its next notice. Closed loop, one
  task in flight per device: 5 messages per task as in the app's round trip, no database.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import aiormq
import asyncpg
from aiormq.abc import DeliveredMessage
from yarl import URL

from app.broker import AMQ_TOPIC, ConfirmedPublisher, Outgoing, tls_context
from app.settings import Settings
from bench.env import ROOT, die_with_harness, python_command, stop_process
from bench.fleet import Fleet
from bench.progress import Progress, percentiles_ms
from swarm_device.protocol import notify_topic, reply_topic

RAW_DEVICE = "bench-raw"
STOP_TIMEOUT_S = 30.0
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


async def roundtrip_ceiling(
    settings: Settings, fleet: Fleet, devices: int, duration_s: float, progress: Progress
) -> dict[str, Any]:
    """Tasks per second the broker carries with `devices` closed-loop devices and no app."""
    publisher = ConfirmedPublisher(settings.broker, name="bench raw round trip")
    await publisher.connect()
    connection = await aiormq.connect(
        URL(settings.broker.url).update_query(auth="EXTERNAL", name="bench raw consumer"),
        context=tls_context(settings.broker),
    )
    noticed_at: dict[str, float] = {}  # devices with a chain under way: when it began
    latencies: list[float] = []
    counting = False

    async def notice(device_id: str) -> None:
        noticed_at[device_id] = time.monotonic()
        body = b'{"event":"task_queued","task_id":"00000000-0000-0000-0000-000000000000"}'
        await publisher.publish(Outgoing(notify_topic(device_id), body, str(uuid.uuid4()), expiry_s=3600))

    async def answer(message: DeliveredMessage) -> None:
        routing_key = message.routing_key or ""
        device_id, step = routing_key.split(".")[1], routing_key.rsplit(".", 1)[1]
        headers = message.header.properties.headers or {}
        reply_to = headers.get("x-reply-to-topic")
        await publisher.publish(
            Outgoing(
                reply_topic(device_id),
                b'{"id":"r","result":null}',
                str(uuid.uuid4()),
                correlation_id=message.header.properties.correlation_id,
                routing_key=reply_to if isinstance(reply_to, str) else None,
            )
        )
        await channel.basic_ack(message.delivery_tag)  # type: ignore[arg-type]
        # One chain per device: a result that does not end the device's current one (a copy of a
        # request, a second consumer of a run killed mid-way) is answered but starts nothing, or
        # the chains would multiply with every copy.
        began = noticed_at.pop(device_id, None) if step == "result" else None
        if began is not None:
            if counting:
                latencies.append(time.monotonic() - began)
            await notice(device_id)

    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=settings.broker.prefetch)
    declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
    assert declared.queue is not None
    await channel.queue_bind(declared.queue, AMQ_TOPIC.name, routing_key="dev.*.up.raw.#")
    await channel.basic_consume(declared.queue, answer)  # aiormq runs each delivery in a task of its own
    process = await asyncio.create_subprocess_exec(
        *python_command(
            "bench.raw_devices",
            f"--host={settings.broker.mqtt_host}",
            f"--port={settings.broker.mqtt_port}",
            f"--ca={settings.pki.ca_cert_file}",
            f"--cert-dir={fleet.cert_dir}",
            f"--prefix={fleet.prefix}",
            f"--count={devices}",
        ),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
        preexec_fn=die_with_harness,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(devices / 20 + 60):
            await process.stdout.readline()  # "ready N"
        await asyncio.gather(*(notice(device_id) for device_id in fleet.ids(devices)))
        await asyncio.sleep(min(2.0, duration_s / 4))  # warm up, then count
        counting, started = True, time.monotonic()
        async with progress.ticking("raw", lambda: f"round trip without the app: {len(latencies)} tasks"):
            await asyncio.sleep(duration_s)
        counting, elapsed = False, time.monotonic() - started
    finally:
        await stop_process(process, STOP_TIMEOUT_S)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await connection.close()
        await publisher.close()
    return {
        "devices": devices,
        "tasks": len(latencies),
        "per_s": round(len(latencies) / elapsed, 1),
        "latency_ms": percentiles_ms(latencies),
    }
