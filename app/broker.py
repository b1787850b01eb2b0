"""The RabbitBroker factory and the one way the core publishes to a device's topics."""

from __future__ import annotations

import logging
import ssl

from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue
from faststream.rabbit.schemas import Channel
from faststream.rabbit.security import RabbitExternalAuth
from pamqp.commands import Basic

from app.settings import BrokerSettings
from swarm_device.protocol import to_routing_key

# MQTT topics live on amq.topic; it exists in every vhost, so never declare it.
AMQ_TOPIC = RabbitExchange("amq.topic", type=ExchangeType.TOPIC, declare=False)
DEAD_LETTER_EXCHANGE = RabbitExchange("swarm.dead-letter", type=ExchangeType.FANOUT, durable=True)
DEAD_LETTER_QUEUE = RabbitQueue("swarm.dead-letter", durable=True)
PUBLISH_TIMEOUT_S = 10.0


def tls_context(settings: BrokerSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(settings.ca_file))
    context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    return context


def create_broker(settings: BrokerSettings) -> RabbitBroker:
    """The core's AMQP connection: AMQPS, authenticated by its own certificate (SASL EXTERNAL)."""
    return RabbitBroker(
        settings.url,
        security=RabbitExternalAuth(tls_context(settings)),
        default_channel=Channel(prefetch_count=settings.prefetch),
        graceful_timeout=10.0,
        log_level=logging.DEBUG,
        description="Swarm Core device protocol: devices publish to dev/{id}/up/..., the core answers on "
        "dev/{id}/down/...",
    )


async def declare_dead_letter_path(broker: RabbitBroker) -> None:
    exchange = await broker.declare_exchange(DEAD_LETTER_EXCHANGE)
    queue = await broker.declare_queue(DEAD_LETTER_QUEUE)
    await queue.bind(exchange, routing_key="")


async def publish_to_device(
    broker: RabbitBroker,
    topic: str,
    body: bytes,
    *,
    message_id: str,
    correlation_id: str | None = None,
    routing_key: str | None = None,
) -> bool:
    """Publish with a broker confirm; True if a device queue took it, False if nobody subscribes.

    Raises when the broker did not confirm (connection lost, timeout): the caller keeps the
    database as the truth and retries later.
    """
    result = await broker.publish(
        body,
        exchange=AMQ_TOPIC,
        routing_key=routing_key or to_routing_key(topic),
        mandatory=True,
        persist=True,
        message_id=message_id,
        correlation_id=correlation_id,
        content_type="application/json",
        timeout=PUBLISH_TIMEOUT_S,
    )
    return isinstance(result, Basic.Ack)
