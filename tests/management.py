"""What the tests ask the broker: consumers of the core's queues (management API), dead letters."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
from faststream.rabbit import RabbitBroker

from app.broker import DEAD_LETTER_QUEUE, create_broker
from app.settings import BrokerSettings


def management_client(broker: BrokerSettings) -> httpx.AsyncClient:
    auth = (broker.management_user, broker.management_password.get_secret_value())
    return httpx.AsyncClient(base_url=broker.management_url, auth=auth, timeout=10)


async def rpc_consumers(broker: BrokerSettings) -> dict[str, int]:
    """Consumers per `swarm.rpc.*` queue (the management statistics trail by a few seconds)."""
    async with management_client(broker) as client:
        response = await client.get(f"/api/queues/{broker.devices_vhost}", params={"columns": "name,consumers"})
    response.raise_for_status()
    return {q["name"]: q.get("consumers", 0) for q in response.json() if q["name"].startswith("swarm.rpc.")}


async def wait_for_consumers(broker: BrokerSettings, count: int, within_s: float = 20) -> dict[str, int]:
    """Poll until every `swarm.rpc.*` queue shows exactly `count` consumers; returns the counts."""
    counts: dict[str, int] = {}
    try:
        async with asyncio.timeout(within_s):
            while True:
                counts = await rpc_consumers(broker)
                # No queues at all (a fresh broker) means no consumers too.
                if set(counts.values()) == {count} or (count == 0 and not counts):
                    return counts
                await asyncio.sleep(1)
    except TimeoutError:
        raise AssertionError(f"expected {count} consumers per queue, the broker shows {counts}") from None


@contextlib.asynccontextmanager
async def core_broker(settings: BrokerSettings) -> AsyncIterator[RabbitBroker]:
    """An AMQP connection as the core (its certificate): the management user may not read queues."""
    broker = create_broker(settings)
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.stop()


async def dead_letter_count(broker: RabbitBroker) -> int:
    """Messages parked in `swarm.dead-letter` right now (a declare answers the live count)."""
    queue = await broker.declare_queue(DEAD_LETTER_QUEUE)
    declared = await queue.declare()
    assert declared.message_count is not None
    return declared.message_count
