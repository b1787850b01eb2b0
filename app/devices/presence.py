"""Presence: the broker's connection events (rabbitmq_event_exchange) set devices online/offline.

One durable queue with a single active consumer, so that events are applied in the order the
broker emitted them even with several app processes. A lost event is repaired by the periodic
reconciliation against the management API.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from faststream import AckPolicy
from faststream.rabbit import ExchangeType, QueueType, RabbitExchange, RabbitQueue, RabbitRouter
from faststream.rabbit.annotations import RabbitMessage

from app.devices import service
from app.devices.service import Sessions
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


def _event_time(headers: dict[str, Any]) -> datetime:
    stamp = headers.get("timestamp_in_ms")
    return datetime.fromtimestamp(stamp / 1000, UTC) if isinstance(stamp, int) else datetime.now(UTC)


def register(router: RabbitRouter, sessions: Sessions) -> None:
    @router.subscriber(
        PRESENCE_QUEUE, EVENT_EXCHANGE, ack_policy=AckPolicy.REJECT_ON_ERROR, no_reply=True, include_in_schema=False
    )
    async def on_connection_event(message: RabbitMessage) -> None:
        headers = message.headers
        name = headers.get("name")
        if not isinstance(name, str):
            return
        routing_key = message.raw_message.routing_key
        if routing_key == "connection.created":
            user = headers.get("user")
            if "MQTT" in str(headers.get("protocol", "")) and isinstance(user, str) and DEVICE_ID_RE.fullmatch(user):
                await service.device_connected(sessions, name, user, _event_time(headers))
        elif routing_key == "connection.closed":
            await service.connection_closed(sessions, name, _event_time(headers))
