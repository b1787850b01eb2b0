"""The notifier on the real broker and database: lane order, routed and unroutable notices.

Each test runs its own Notifier and ConfirmedPublisher (as the lifespan wires them) over tasks
it inserts itself, and watches the notices with a queue bound to the device's notify topic.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import orjson
import pytest
from aio_pika.abc import AbstractQueue
from faststream.rabbit import RabbitQueue

from app.broker import AMQ_TOPIC, ConfirmedPublisher
from app.db import Sessions
from app.settings import Settings
from app.tasks import batch, service
from app.tasks.notifier import BULK_NOTICES_FLOOR_PER_S, Notifier
from app.tasks.schemas import TaskBatchCreate
from swarm_device.protocol import notify_topic, to_routing_key
from tests.conftest import unique_device_id
from tests.management import core_broker

WINDOW = 50
BULK = 1_000


@pytest.fixture
async def notifier(settings: Settings, sessions: Sessions) -> AsyncIterator[Notifier]:
    """A notifier with small windows, not started: the test queues notices, then starts it."""
    publisher = ConfirmedPublisher(settings.broker)
    notifier = Notifier(publisher, sessions, window=WINDOW)
    try:
        yield notifier
    finally:
        await notifier.stop()
        await publisher.close()


async def queued_tasks(db: asyncpg.Connection, device_id: str, count: int) -> list[uuid.UUID]:
    """QUEUED tasks of a database-only device, their notices due."""
    ids = [uuid.uuid4() for _ in range(count)]
    await db.execute("INSERT INTO devices (id) VALUES ($1) ON CONFLICT DO NOTHING", device_id)
    # Due in an hour: the in-process app's re-send job (if a test started it) must leave them to us.
    await db.execute(
        "INSERT INTO tasks (id, device_id, method, params, max_attempts, timeout_s, notice_due_at) "
        "SELECT unnest($1::uuid[]), $2, 'echo', '{}', 3, 300, now() + interval '1 hour'",
        ids,
        device_id,
    )
    return ids


@contextlib.asynccontextmanager
async def notify_queue(settings: Settings, device_id: str) -> AsyncIterator[AbstractQueue]:
    """A queue bound to the device's notify topic, as its MQTT subscription would be."""
    async with core_broker(settings.broker) as broker:
        queue = await broker.declare_queue(RabbitQueue(f"test.notices.{device_id}", auto_delete=True, exclusive=True))
        await queue.bind(await broker.declare_exchange(AMQ_TOPIC), routing_key=to_routing_key(notify_topic(device_id)))
        yield queue


async def received_task_ids(queue: AbstractQueue) -> list[str]:
    """The notices in the queue, in the order the broker routed them."""
    task_ids = []
    while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
        task_ids.append(orjson.loads(message.body)["task_id"])
    return task_ids


async def notice_states(db: asyncpg.Connection, device_id: str) -> dict[tuple[str, bool], int]:
    rows = await db.fetch(
        "SELECT status, notice_due_at IS NULL AS noticed, count(*) AS n FROM tasks WHERE device_id = $1 GROUP BY 1, 2",
        device_id,
    )
    return {(row["status"], row["noticed"]): row["n"] for row in rows}


async def test_a_single_task_notice_goes_before_a_batch_backlog(
    settings: Settings, db: asyncpg.Connection, notifier: Notifier
) -> None:
    device_id = unique_device_id("lane")
    batch = await queued_tasks(db, device_id, BULK)
    [single] = await queued_tasks(db, device_id, 1)
    async with notify_queue(settings, device_id) as queue:
        notifier.tasks_queued_in_bulk((task_id, device_id) for task_id in batch)
        notifier.task_queued(single, device_id)
        # Handed back (as the re-send job does) while still waiting: not sent twice.
        notifier.task_queued(batch[0], device_id)
        notifier.start()
        await notifier.stop(timeout_s=60)
        received = await received_task_ids(queue)

    assert sorted(received) == sorted(str(task_id) for task_id in [*batch, single])
    # Queued after the whole batch, published within the first window.
    assert received.index(str(single)) < WINDOW
    assert await notice_states(db, device_id) == {("sent", True): BULK + 1}


async def test_unroutable_notices_leave_the_outbox_and_the_task_queued(
    settings: Settings, db: asyncpg.Connection, notifier: Notifier
) -> None:
    listening, offline = unique_device_id("on"), unique_device_id("off")
    routed = await queued_tasks(db, listening, 3)
    unrouted = await queued_tasks(db, offline, 3)
    async with notify_queue(settings, listening) as queue:
        for task_id in routed:
            notifier.task_queued(task_id, listening)
        notifier.tasks_queued_in_bulk((task_id, offline) for task_id in unrouted)
        notifier.start()
        await notifier.stop(timeout_s=30)
        received = await received_task_ids(queue)

    assert sorted(received) == sorted(str(task_id) for task_id in routed)
    # SENT means routed to the device's queue (decision 2); the offline device pulls on connect.
    assert await notice_states(db, listening) == {("sent", True): 3}
    assert await notice_states(db, offline) == {("queued", True): 3}
    events = await db.fetch(
        "SELECT t.device_id, max(e.version) AS version FROM task_events e JOIN tasks t ON t.id = e.task_id "
        "WHERE t.device_id = ANY($1::text[]) GROUP BY t.device_id",
        [listening, offline],
    )
    # One audit event for the step to SENT; none for clearing the outbox alone.
    assert {row["device_id"]: row["version"] for row in events} == {listening: 2, offline: 1}


async def test_notices_handed_back_fill_the_bulk_lane_behind_fresh_ones(
    settings: Settings, db: asyncpg.Connection, sessions: Sessions, notifier: Notifier
) -> None:
    device_id = unique_device_id("resend")
    overdue = await queued_tasks(db, device_id, BULK + 500)
    async with notify_queue(settings, device_id) as queue:
        # Their notices are due in an hour, out of reach of the in-process app's re-send job
        # (10 s overdue); for this call, anything due within two hours is overdue.
        handed_back = await service.resend_notices(sessions, notifier, older_than_s=-7200)
        # More than one job run used to take (1,000): as many as the bulk lane has room for.
        assert handed_back >= len(overdue)
        # Leased for the time the lane needs at the floor pace: no other process's job takes them.
        leased = await db.fetchval("SELECT min(notice_due_at - now()) FROM tasks WHERE id = ANY($1::uuid[])", overdue)
        assert leased > timedelta(seconds=len(overdue) / BULK_NOTICES_FLOOR_PER_S)
        [single] = await queued_tasks(db, device_id, 1)
        notifier.task_queued(single, device_id)
        notifier.start()
        await notifier.stop(timeout_s=60)
        received = await received_task_ids(queue)

    assert sorted(received) == sorted(str(task_id) for task_id in [*overdue, single])
    # A fresh notice goes before the notices handed back, published within the first window.
    assert received.index(str(single)) < WINDOW
    assert await notice_states(db, device_id) == {("sent", True): len(overdue) + 1}


async def test_a_batch_s_notices_are_due_once_the_lane_ahead_should_have_sent_them(
    settings: Settings, db: asyncpg.Connection, sessions: Sessions, notifier: Notifier
) -> None:
    waiting_device = unique_device_id("ahead")
    notifier.tasks_queued_in_bulk((task_id, waiting_device) for task_id in await queued_tasks(db, waiting_device, BULK))
    device_ids = [unique_device_id("lease") for _ in range(3)]
    await db.execute("INSERT INTO devices (id) SELECT unnest($1::text[])", device_ids)
    body = TaskBatchCreate.model_validate({"method": "echo", "device_ids": device_ids})

    created, _ = await batch.create_batch(sessions, notifier, settings.tasks, body, "/api/v1/tasks")

    leases = await db.fetch(
        "SELECT t.notice_due_at - b.created_at AS lease FROM tasks t JOIN task_batches b ON b.id = t.batch_id "
        "WHERE b.id = $1",
        created.id,
    )
    # Its notices queue behind BULK others: due once all of them should have gone out.
    lease = timedelta(seconds=(BULK + len(device_ids)) / BULK_NOTICES_FLOOR_PER_S)
    assert [row["lease"] for row in leases] == [lease] * len(device_ids)
