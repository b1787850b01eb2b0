"""Desired configuration: stored in the database, published retained on `dev/{id}/down/config`.

RabbitMQ keeps a retained message only when an MQTT client publishes it with the retain flag;
an AMQP publish cannot set that flag. So the core publishes desired configuration over MQTT
itself, with its own certificate (its broker user has no topic restrictions), on a short
connection per round: configuration changes are rare, and a long-lived connection would be one
more resource whose client id replicas would fight over. The database stays the truth: a device
row keeps `config_due_at` until its configuration was acknowledged (PUBACK), and a periodic job
publishes what is still due.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from typing import Any

import aiomqtt
import orjson
from cryptography import x509

from app import pki
from app.broker import tls_context
from app.db import Sessions
from app.devices import repository as repo
from app.devices.models import Device
from app.devices.schemas import DeviceConfigRead
from app.devices.service import active_device
from app.errors import FailedRows
from app.settings import BrokerSettings
from swarm_device.protocol import config_topic

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
# The periodic job's name in FailedRows.
CONFIGS = "configs"


class RetainedPublisher:
    """Publishes retained QoS 1 messages to device topics over MQTT, as the core's broker user."""

    def __init__(self, settings: BrokerSettings) -> None:
        self._host = settings.mqtt_host
        self._port = settings.mqtt_port
        self._tls: ssl.SSLContext = tls_context(settings)
        # RabbitMQ 4.x binds the client id to the certificate (its first DNS SAN, the CN here).
        self._client_id = pki.common_name(x509.load_pem_x509_certificate(settings.cert_file.read_bytes())) or ""

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish (topic, payload) pairs retained; returns once the broker acknowledged all."""
        async with aiomqtt.Client(
            self._host,
            self._port,
            identifier=self._client_id,
            tls_context=self._tls,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=True,
            timeout=CONNECT_TIMEOUT_S,
        ) as client:
            for topic, payload in messages:
                await client.publish(topic, payload, qos=1, retain=True)


def to_config_read(device: Device) -> DeviceConfigRead:
    return DeviceConfigRead(
        device_id=device.id,
        desired=device.desired_config,
        desired_at=device.desired_at,
        reported=device.reported_state,
        reported_at=device.reported_at,
        in_sync=device.desired_config is not None and device.desired_config == device.reported_state,
        published=device.desired_config is not None and device.config_due_at is None,
    )


async def get_config(sessions: Sessions, device_id: str) -> DeviceConfigRead:
    async with sessions() as session:
        return to_config_read(await active_device(session, device_id))


async def set_desired(
    sessions: Sessions, publisher: RetainedPublisher, failed: FailedRows, device_id: str, desired: dict[str, Any]
) -> DeviceConfigRead:
    """Store the desired configuration and commit; then publish it retained to the device."""
    async with sessions() as session:
        await active_device(session, device_id, lock=True)
        await repo.set_desired_config(session, device_id, desired)
        await session.commit()
    await publish_due(sessions, publisher, failed, [device_id])
    return await get_config(sessions, device_id)


async def publish_due(
    sessions: Sessions,
    publisher: RetainedPublisher,
    failed: FailedRows,
    device_ids: Sequence[str] | None = None,
) -> int:
    """Publish the desired configuration of devices whose config is due (all due ones, or these).

    The rows stay locked while publishing, so that the last publish of a device is always its
    latest committed configuration, whichever replica publishes. A configuration that cannot be
    published (stored before it was validated) stays due, is logged once and left out (`failed`):
    the others are published. Returns how many were published.
    """
    async with sessions() as session:
        due = await repo.lock_config_due(session, device_ids, skip=failed.of(CONFIGS))
        messages: list[tuple[str, bytes]] = []
        published: list[str] = []
        for device in due:
            try:
                messages.append((config_topic(device.id), orjson.dumps(device.desired_config)))
            except TypeError as exc:
                failed.add(CONFIGS, (device.id, device.desired_at), exc)
            else:
                published.append(device.id)
        if not messages:
            return 0
        try:
            await publisher.publish(messages)
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            # Still due: the periodic job publishes it again.
            log.warning("publishing the configuration of %d device(s) failed: %r", len(messages), exc)
            return 0
        await repo.clear_config_due(session, published)
        await session.commit()
    return len(published)
