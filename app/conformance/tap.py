"""An AMQP tap on one device's topics: what the device publishes and what the core sends it.

The kit connects to the devices vhost the way the core does (AMQPS, its certificate, SASL
EXTERNAL) and binds an exclusive queue of its own to `amq.topic` with `dev.{id}.up.#` and
`dev.{id}.down.#`: it sees every message without taking any from the core's queues. It also
publishes to the device's down-topics, for the duplicate and malformed messages of the rules.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from yarl import URL

from app.broker import AMQ_TOPIC, tls_context
from app.settings import BrokerSettings
from swarm_device.protocol import to_routing_key

UP_RPC = "/up/rpc/"


@dataclass(frozen=True)
class Seen:
    """One message on the device's topics, as the tap saw it."""

    at: float  # loop time
    topic: str  # MQTT form: dev/{id}/up/rpc/tasks/next
    body: bytes

    @property
    def method(self) -> str | None:
        """`tasks/{task_id}/result` for a request of the device, None for anything else."""
        _, found, method = self.topic.partition(UP_RPC)
        return method if found else None

    @property
    def json(self) -> Any:
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None

    @property
    def request_id(self) -> str | None:
        decoded = self.json
        return str(decoded.get("id")) if isinstance(decoded, dict) and "id" in decoded else None


class DeviceTap:
    """Records the device's traffic from the moment `open()` returns."""

    def __init__(self, connection: AbstractRobustConnection, device_id: str) -> None:
        self._connection = connection
        self.device_id = device_id
        self.seen: list[Seen] = []
        self._arrived = asyncio.Condition()
        self._channel: aio_pika.abc.AbstractChannel | None = None

    @classmethod
    async def open(cls, settings: BrokerSettings, device_id: str) -> Self:
        url = URL(settings.url).update_query(auth="EXTERNAL", name=f"swarm conformance {device_id}")
        connection = await aio_pika.connect_robust(url, ssl_context=tls_context(settings))
        tap = cls(connection, device_id)
        channel = tap._channel = await connection.channel()
        exchange = await channel.get_exchange(AMQ_TOPIC.name, ensure=False)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for direction in ("up", "down"):
            await queue.bind(exchange, routing_key=f"dev.{device_id}.{direction}.#")
        await queue.consume(tap._record, no_ack=True)
        return tap

    async def close(self) -> None:
        await self._connection.close()

    async def _record(self, message: AbstractIncomingMessage) -> None:
        topic = (message.routing_key or "").replace(".", "/")
        async with self._arrived:
            self.seen.append(Seen(asyncio.get_running_loop().time(), topic, message.body))
            self._arrived.notify_all()

    def mark(self) -> int:
        """A position in the record: `since(mark)` and `wait_for(..., after=mark)` look past it."""
        return len(self.seen)

    async def quiet_for(self, quiet_s: float, within_s: float) -> bool:
        """Wait until nothing has passed for `quiet_s` (at most `within_s`); False if it never went quiet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while loop.time() < deadline:
            last = self.seen[-1].at if self.seen else 0.0
            if loop.time() - last >= quiet_s:
                return True
            await asyncio.sleep(0.1)
        return False

    def since(self, mark: int, match: Callable[[Seen], bool] = lambda _: True) -> list[Seen]:
        return [seen for seen in self.seen[mark:] if match(seen)]

    async def wait_for(self, match: Callable[[Seen], bool], after: int, within_s: float) -> Seen | None:
        """The first message past `after` that matches, waiting up to `within_s`; None if none came."""
        checked = after
        try:
            async with asyncio.timeout(within_s), self._arrived:
                while True:
                    for seen in self.seen[checked:]:
                        if match(seen):
                            return seen
                    checked = len(self.seen)
                    await self._arrived.wait()
        except TimeoutError:
            return None

    async def publish(self, topic: str, body: bytes) -> None:
        """Publish raw bytes to one of the device's down-topics (as the core would)."""
        assert self._channel is not None
        exchange = await self._channel.get_exchange(AMQ_TOPIC.name, ensure=False)
        await exchange.publish(aio_pika.Message(body, delivery_mode=2), routing_key=to_routing_key(topic))
