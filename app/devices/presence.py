"""Presence: the broker's connection events (rabbitmq_event_exchange) set devices online/offline.

One durable queue with a single active consumer, so that events are applied in the order the
broker emitted them even with several app processes. The consumer takes each event as it comes
and applies all those that arrived meanwhile in one transaction, in order: while devices connect
by the thousand, a transaction per event (a commit with its disk sync each) fell behind. The
events stay unacknowledged until their transaction commits. A lost event is repaired by the
periodic reconciliation against the management API.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from faststream import AckPolicy
from faststream.rabbit import ExchangeType, QueueType, RabbitExchange, RabbitQueue, RabbitRouter
from faststream.rabbit.schemas import Channel

from app.db import Sessions
from app.device_limits import ConnectLimiter
from app.device_rpc import RabbitMessage
from app.devices import service
from app.devices.repository import ConnectionEvent
from app.errors import until_infrastructure_answers
from swarm_device.protocol import DEVICE_ID_RE

log = logging.getLogger(__name__)

EVENT_EXCHANGE = RabbitExchange("amq.rabbitmq.event", type=ExchangeType.TOPIC, declare=False)
PRESENCE_QUEUE = RabbitQueue(
    "swarm.presence",
    durable=True,
    queue_type=QueueType.QUORUM,
    routing_key="connection.*",
    arguments={"x-single-active-consumer": True},
)
# Events in hand at most, hence in one transaction at most.
PRESENCE_PREFETCH = 256


def _event_time(headers: dict[str, Any]) -> datetime:
    stamp = headers.get("timestamp_in_ms")
    return datetime.fromtimestamp(stamp / 1000, UTC) if isinstance(stamp, int) else datetime.now(UTC)


def connection_event(routing_key: str, headers: dict[str, Any]) -> ConnectionEvent | None:
    """The event about a device's connection, or None for one that is not (the core's own AMQP
    connections, a user that is no device id, other event kinds)."""
    name = headers.get("name")
    if not isinstance(name, str):
        return None
    if routing_key == "connection.created":
        user = headers.get("user")
        if "MQTT" in str(headers.get("protocol", "")) and isinstance(user, str) and DEVICE_ID_RE.fullmatch(user):
            return ConnectionEvent(name, user, _event_time(headers))
        return None
    if routing_key == "connection.closed":
        return ConnectionEvent(name, None, _event_time(headers))
    return None


class PresenceConsumer:
    """Applies connection events in the order they arrive, as many per transaction as have come."""

    def __init__(self, sessions: Sessions, connects: ConnectLimiter | None = None) -> None:
        self._sessions = sessions
        self._connects = connects
        self._waiting: list[RabbitMessage] = []
        self._applying: asyncio.Task[None] | None = None

    def register(self, router: RabbitRouter) -> None:
        router.subscriber(
            PRESENCE_QUEUE,
            EVENT_EXCHANGE,
            channel=Channel(prefetch_count=PRESENCE_PREFETCH),
            ack_policy=AckPolicy.MANUAL,
            no_reply=True,
            include_in_schema=False,
        )(self.consume)

    async def consume(self, message: RabbitMessage) -> None:
        # FastStream hands over one message at a time, in queue order: keep it and return for the
        # next; one task at a time applies what has been kept.
        self._waiting.append(message)
        if self._applying is None or self._applying.done():
            self._applying = asyncio.create_task(self._apply_waiting())

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Let the events in hand be applied (bounded), before the broker connection closes."""
        if self._applying is not None:
            await asyncio.wait({self._applying}, timeout=timeout_s)
        if self._connects is not None:
            await self._connects.drain()

    async def _apply_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                await self._apply(batch)
            except Exception:
                # Only an ack can fail here (broker gone): the events come back with the channel.
                log.exception("connection events could not be acknowledged; they will be redelivered")

    async def _apply(self, messages: Sequence[RabbitMessage]) -> None:
        events = [connection_event(m.raw_message.routing_key or "", m.headers) for m in messages]
        if self._connects is not None:
            # One consumer for all app processes: it sees every connect of a device (a reconnect storm).
            for event in events:
                if event is not None and event.device_id is not None:
                    self._connects.connected(event.device_id)
        try:
            await self._apply_events([e for e in events if e is not None])
        except Exception:
            log.exception("applying %d connection events together failed; applying them one by one", len(events))
            await self._apply_one_by_one(messages, events)
            return
        for message in messages:
            await message.ack()

    async def _apply_one_by_one(
        self, messages: Sequence[RabbitMessage], events: Sequence[ConnectionEvent | None]
    ) -> None:
        for message, event in zip(messages, events, strict=True):
            try:
                if event is not None:
                    await self._apply_events([event])
            except Exception:
                # Dropped, not retried forever: the periodic reconciliation repairs presence.
                log.exception("connection event %s could not be applied; dropped", event)
                await message.reject(requeue=False)
            else:
                await message.ack()

    async def _apply_events(self, events: Sequence[ConnectionEvent]) -> None:
        if events:
            await until_infrastructure_answers(
                lambda: service.apply_connection_events(self._sessions, events), "applying connection events"
            )


def register(router: RabbitRouter, sessions: Sessions, connects: ConnectLimiter | None = None) -> PresenceConsumer:
    consumer = PresenceConsumer(sessions, connects)
    consumer.register(router)
    return consumer
