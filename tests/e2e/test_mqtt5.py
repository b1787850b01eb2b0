"""MQTT 5 and the device's identity on the real broker (RabbitMQ 4.0, native MQTT), with real
certificates: Response Topic and Correlation Data, notice expiry, session expiry, reason codes,
the client id bound to the certificate, and how retained configuration reaches subscriptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote

import aiomqtt
import httpx
import orjson
import paho.mqtt.client as paho
import pytest
from faststream.rabbit import RabbitQueue
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from app.broker import AMQ_TOPIC, ConfirmedPublisher
from app.devices.config import RetainedPublisher
from app.settings import Settings
from app.tasks.notifier import PendingNotice
from swarm_device import protocol
from tests.conftest import DeviceCredentials, EnrolDevice
from tests.e2e.test_sdk_device import make_device
from tests.management import core_broker, management_client
from tests.polling import eventually

V5 = aiomqtt.ProtocolVersion.V5
V311 = aiomqtt.ProtocolVersion.V311
CLIENT_ID_NOT_VALID = 133
NOT_AUTHORIZED = 0x87


def _connect_properties(session_expiry_s: int) -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = session_expiry_s
    return properties


@contextlib.asynccontextmanager
async def mqtt(
    settings: Settings,
    creds: DeviceCredentials,
    *,
    client_id: str | None = None,
    version: aiomqtt.ProtocolVersion = V5,
    session_expiry_s: int = 0,
) -> AsyncIterator[aiomqtt.Client]:
    """A bare MQTT client with the device's certificate; MQTT 5 resumes its session if any."""
    tls = ssl.create_default_context(cafile=str(creds.ca_file))
    tls.load_cert_chain(creds.cert_file, creds.key_file)
    v5 = version is V5
    client = aiomqtt.Client(
        settings.broker.mqtt_host,
        settings.broker.mqtt_port,
        identifier=client_id or creds.device_id,
        protocol=version,
        clean_session=None if v5 else True,
        clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        properties=_connect_properties(session_expiry_s) if v5 else None,
        tls_context=tls,
        timeout=10,
    )
    async with client:
        yield client


async def next_message(client: aiomqtt.Client, within_s: float = 10.0) -> aiomqtt.Message:
    async with asyncio.timeout(within_s):
        return await anext(client.messages)


async def no_message(client: aiomqtt.Client, for_s: float) -> None:
    try:
        message = await next_message(client, for_s)
    except TimeoutError:
        return
    pytest.fail(f"unexpected message on {message.topic.value}: {message.payload!r}")


def _code(rc: object) -> int:
    return rc.value if isinstance(rc, ReasonCode) else int(rc)  # type: ignore[call-overload]


def _property(message: aiomqtt.Message, name: str) -> object:
    return getattr(message.properties, name, None)


async def session_queue_exists(settings: Settings, device_id: str) -> bool:
    # Native MQTT keeps a session's QoS 1 subscriptions in this queue (as 3.10 did).
    name = quote(f"mqtt-subscription-{device_id}qos1", safe="")
    async with management_client(settings.broker) as client:
        response = await client.get(f"/api/queues/{quote(settings.broker.devices_vhost, safe='')}/{name}")
    assert response.status_code in (200, 404), response.text
    return response.status_code == 200


async def test_request_with_response_topic_is_answered_there_with_its_correlation_data(
    enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds = await enrol_device("m5")
    answers = f"dev/{creds.device_id}/down/answers"
    async with mqtt(settings, creds) as client:
        await client.subscribe([(answers, 1), (protocol.reply_topic(creds.device_id), 1)])
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ResponseTopic = answers
        properties.CorrelationData = b"corr-42"
        request = {"id": "r-1", "params": {"firmware": "5.0"}}
        await client.publish(
            protocol.request_topic(creds.device_id, protocol.METHOD_HELLO),
            orjson.dumps(request),
            qos=1,
            properties=properties,
        )
        reply = await next_message(client)

    assert reply.topic.value == answers
    assert _property(reply, "CorrelationData") == b"corr-42"
    body = orjson.loads(reply.payload)
    assert body["id"] == "r-1"
    assert body["result"]["firmware"] == "5.0"


async def test_a_response_topic_outside_the_device_s_own_topics_is_not_used(
    enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds = await enrol_device("m5")
    other = await enrol_device("m5")
    async with mqtt(settings, creds) as client:
        await client.subscribe(protocol.reply_topic(creds.device_id), qos=1)
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ResponseTopic = f"dev/{other.device_id}/down/reply"
        properties.CorrelationData = b"elsewhere"
        await client.publish(
            protocol.request_topic(creds.device_id, protocol.METHOD_HELLO),
            orjson.dumps({"id": "r-2", "params": {}}),
            qos=1,
            properties=properties,
        )
        reply = await next_message(client)

    # Answered on the device's own reply topic instead, without the other's correlation data.
    assert reply.topic.value == protocol.reply_topic(creds.device_id)
    assert orjson.loads(reply.payload)["id"] == "r-2"
    assert _property(reply, "CorrelationData") is None


async def test_notices_carry_an_expiry(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds = await enrol_device("m5")
    topic = protocol.notify_topic(creds.device_id)
    async with core_broker(settings.broker) as broker:
        queue = await broker.declare_queue(
            RabbitQueue(f"test.expiry.{creds.device_id}", auto_delete=True, exclusive=True)
        )
        await queue.bind(await broker.declare_exchange(AMQ_TOPIC), routing_key=protocol.to_routing_key(topic))
        async with mqtt(settings, creds) as client:
            await client.subscribe(topic, qos=1)
            created = await app_client.post(f"/devices/{creds.device_id}/tasks", json={"method": "echo"})
            assert created.status_code == 201, created.text
            notice = await next_message(client)
        seen = await queue.get(no_ack=True, timeout=10)

    assert orjson.loads(notice.payload) == {"event": "task_queued", "task_id": created.json()["id"]}
    # The broker holds the notice at most this long (the next test shows it dropped). RabbitMQ
    # 4.0.5 does not pass an AMQP 0.9.1 `expiration` on as MQTT 5 Message Expiry Interval.
    assert seen.expiration == settings.tasks.notice_expiry_s
    assert _property(notice, "MessageExpiryInterval") is None


async def test_an_expired_notice_is_not_delivered_to_a_late_device_whose_pull_still_gets_the_task(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds = await enrol_device("m5")
    device_id = creds.device_id
    async with mqtt(settings, creds, session_expiry_s=600) as client:
        await client.subscribe(protocol.notify_topic(device_id), qos=1)
        created = await app_client.post(f"/devices/{device_id}/tasks", json={"method": "echo"})
        assert created.status_code == 201, created.text
        await next_message(client)  # the task's own notice, sent while online
    task_id = uuid.UUID(created.json()["id"])

    # Offline, with its session kept: one notice that expires at once, one that does not.
    publisher = ConfirmedPublisher(settings.broker)
    try:
        assert await publisher.publish(PendingNotice(task_id, device_id, "task_queued").message(expiry_s=1))
        assert await publisher.publish(PendingNotice(task_id, device_id, "task_canceled").message(expiry_s=600))
    finally:
        await publisher.close()
    await asyncio.sleep(3)

    async with mqtt(settings, creds, session_expiry_s=600) as client:
        await client.subscribe(protocol.notify_topic(device_id), qos=1)
        await client.subscribe(protocol.reply_topic(device_id), qos=1)
        late = await next_message(client)
        # The session kept the live notice; the expired one, queued before it, was dropped.
        assert orjson.loads(late.payload)["event"] == "task_canceled"
        await no_message(client, 2)
        await client.publish(
            protocol.request_topic(device_id, protocol.METHOD_TASKS_NEXT),
            orjson.dumps({"id": "pull", "params": {}}),
            qos=1,
        )
        pulled = orjson.loads((await next_message(client)).payload)

    assert pulled["id"] == "pull"
    assert pulled["result"]["id"] == str(task_id)


@pytest.mark.parametrize(("session_expiry", "kept"), [(2, False), (600, True)])
async def test_the_session_expiry_the_sdk_asks_for_is_honoured(
    enrol_device: EnrolDevice, settings: Settings, session_expiry: int, kept: bool
) -> None:
    creds = await enrol_device("m5")
    device = make_device(settings, creds, session_expiry=session_expiry)
    async with device:
        await asyncio.wait_for(device.ready.wait(), 20)
        assert device.protocol_version == "5"
        assert await session_queue_exists(settings, creds.device_id)
    await asyncio.sleep(8)
    assert await session_queue_exists(settings, creds.device_id) is kept


async def test_a_forbidden_subscription_is_refused(enrol_device: EnrolDevice, settings: Settings) -> None:
    creds = await enrol_device("m5")
    other = await enrol_device("m5")
    async with mqtt(settings, creds) as client:
        # RabbitMQ 4.0 answers SUBACK "Not authorized" (0x87), then closes the connection; the
        # close may overtake the SUBACK on the client's side.
        with contextlib.suppress(aiomqtt.MqttError):
            granted = await client.subscribe(protocol.notify_topic(other.device_id), qos=1)
            assert [_code(code) for code in granted] == [NOT_AUTHORIZED]
        with pytest.raises(aiomqtt.MqttError):
            await next_message(client)


# 3.1.1's CONNACK return code 2 (identifier rejected) is given by paho as reason code 133 too.
@pytest.mark.parametrize("version", [V5, V311])
async def test_a_device_cannot_connect_with_another_device_s_client_id(
    enrol_device: EnrolDevice, settings: Settings, version: aiomqtt.ProtocolVersion
) -> None:
    creds = await enrol_device("m5")
    other = await enrol_device("m5")
    with pytest.raises(aiomqtt.MqttCodeError) as refused:
        async with mqtt(settings, creds, client_id=other.device_id, version=version):
            pass
    assert _code(refused.value.rc) == CLIENT_ID_NOT_VALID


async def test_a_connected_device_s_session_cannot_be_taken_over(enrol_device: EnrolDevice, settings: Settings) -> None:
    victim = await enrol_device("m5")
    thief = await enrol_device("m5")
    async with mqtt(settings, victim, session_expiry_s=600) as client:
        await client.subscribe(protocol.reply_topic(victim.device_id), qos=1)
        with pytest.raises(aiomqtt.MqttCodeError) as refused:
            async with mqtt(settings, thief, client_id=victim.device_id, session_expiry_s=600):
                pass
        assert _code(refused.value.rc) == CLIENT_ID_NOT_VALID
        # The victim was not kicked: it still calls and gets its answer.
        await client.publish(
            protocol.request_topic(victim.device_id, protocol.METHOD_HELLO),
            orjson.dumps({"id": "still-here", "params": {}}),
            qos=1,
        )
        reply = await next_message(client)
    assert orjson.loads(reply.payload)["id"] == "still-here"


@pytest.mark.parametrize("version", [V5, V311])
async def test_retained_configuration_reaches_exact_subscriptions_only(
    enrol_device: EnrolDevice, settings: Settings, version: aiomqtt.ProtocolVersion
) -> None:
    creds = await enrol_device("m5")
    topic = protocol.config_topic(creds.device_id)
    await RetainedPublisher(settings.broker).publish([(topic, b'{"rate": 5}')])

    async with mqtt(settings, creds, version=version) as client:
        await client.subscribe(topic, qos=1)
        message = await next_message(client)
    assert message.topic.value == topic
    assert message.retain
    assert message.payload == b'{"rate": 5}'
    # RabbitMQ 4.0 (like 3.10) looks retained messages up by the exact topic of a subscription:
    # a wildcard filter matching the config topic gets nothing.
    for topic_filter in (f"dev/{creds.device_id}/down/#", f"dev/{creds.device_id}/down/+"):
        async with mqtt(settings, creds, version=version) as client:
            await client.subscribe(topic_filter, qos=1)
            await no_message(client, 3)


async def test_presence_sees_mqtt5_devices(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds = await enrol_device("m5")
    async with mqtt(settings, creds):

        async def online() -> bool:
            response = await app_client.get(f"/devices/{creds.device_id}")
            return bool(response.json()["online"])

        await eventually(online, within_s=20)
