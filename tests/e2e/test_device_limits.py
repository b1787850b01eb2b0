"""Per-device limits with real MQTT clients (issue 18): a device over its bucket is refused and shown
to the operator; a flooding device is shut out at the broker; one certificate holds at most two connections; a
reconnect storm is blocked; the SDK in normal operation never meets the limits."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import asyncpg
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.devices.broker_admin import BrokerAdmin
from app.settings import Settings
from swarm_device import protocol
from swarm_device.protocol import METHOD_STATE, METHOD_TASKS_NEXT
from tests.app_process import AppProcess
from tests.conftest import DeviceCredentials, EnrolDevice
from tests.e2e.test_sdk_device import make_device, running
from tests.polling import eventually
from tests.raw_device import raw_device

# Well past the flood meter's burst, within what the meter's queue keeps (2,000).
FLOOD = 1500
FLOOD_WINDOW = 50
# CONNACK "not authorised" (MQTT 3.1.1 return code 5), as paho 2 reports it (reason code 0x87).
NOT_AUTHORISED = 135
# CONNACK "identifier rejected" (3.1.1 return code 2), as paho 2 reports it (reason code 133).
CLIENT_ID_NOT_VALID = 133


@contextlib.asynccontextmanager
async def mqtt_connection(settings: Settings, creds: DeviceCredentials, client_id: str) -> AsyncIterator[None]:
    """One MQTT 3.1.1 connection with the device's certificate and the given client id."""
    tls = ssl.create_default_context(cafile=str(creds.ca_file))
    tls.load_cert_chain(creds.cert_file, creds.key_file)
    client = aiomqtt.Client(
        settings.broker.mqtt_host,
        settings.broker.mqtt_port,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=True,
        tls_context=tls,
        timeout=10,
    )
    async with client:
        yield


async def refused_code(settings: Settings, creds: DeviceCredentials, client_id: str) -> int | None:
    """None if the connection is accepted, else the broker's CONNACK return code."""
    try:
        async with mqtt_connection(settings, creds, client_id):
            return None
    except aiomqtt.MqttCodeError as exc:
        return exc.rc if isinstance(exc.rc, int) or exc.rc is None else exc.rc.value


async def device_record(app_client: httpx.AsyncClient, device_id: str) -> dict[str, object]:
    response = await app_client.get(f"/devices/{device_id}")
    assert response.status_code == 200, response.text
    record: dict[str, object] = response.json()
    return record


async def limited_requests(client: httpx.AsyncClient, device_id: str) -> float:
    text = (await client.get("/metrics")).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "swarm_device_requests_limited_total" and sample.labels.get("device_id") == device_id
    )


@pytest.fixture
async def strict_app(stack_env: dict[str, str], settings: Settings, tmp_path: Path) -> AsyncIterator[AppProcess]:
    """A second app process whose request bucket is tiny (1/s, burst 5): it consumes half of the
    requests beside the in-process app and refuses them whatever the box's speed."""
    env = {
        **stack_env,
        "APP_DATABASE__URL": settings.database.url.get_secret_value(),
        "APP_INSTANCE_NAME": "swarm-strict",
        "APP_SCHEDULER__ENABLED": "false",
        "APP_DEVICE_LIMITS__REQUESTS_PER_S": "1",
        "APP_DEVICE_LIMITS__BURST": "5",
    }
    app = AppProcess("strict", int(stack_env["SWARM_APP_PORT"]) + 20, env, tmp_path / "strict-app.log")
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def test_a_device_over_its_bucket_is_refused_and_shown(
    app_client: httpx.AsyncClient,
    strict_app: AppProcess,
    enrol_device: EnrolDevice,
    settings: Settings,
    db: asyncpg.Connection,
) -> None:
    creds = await enrol_device("eager")
    refusals: list[dict[str, object]] = []
    async with raw_device(settings.broker.mqtt_host, settings.broker.mqtt_port, creds) as device:
        topic = protocol.request_topic(creds.device_id, METHOD_STATE)
        # Invalid params: answered without database work. Short of the flood meter's burst.
        ids = [uuid.uuid4().hex for _ in range(60)]
        for request_id in ids:
            body = {"id": request_id, "params": {"reported": "not an object"}}
            await device.client.publish(topic, orjson.dumps(body), qos=0)

        def refused() -> bool:
            for request_id in ids:
                while not device.replies[request_id].empty():
                    reply = device.replies[request_id].get_nowait()
                    if reply.get("error", {}).get("code") == "rate_limited":
                        refusals.append(reply["error"])
            return bool(refusals)

        await eventually(refused, within_s=30)
    assert isinstance(refusals[0]["retry_after_s"], float)
    record = await device_record(app_client, creds.device_id)
    assert record["last_limited_at"] is not None
    assert record["blocked_until"] is None
    # Counted in the refusing process's metrics, and in the event stream as `device.rate_limited`
    # (app/events/service.py names device events so).
    async with httpx.AsyncClient(base_url=strict_app.url) as strict:
        assert await limited_requests(strict, creds.device_id) > 0
    events = await db.fetch("SELECT event FROM device_events WHERE device_id = $1", creds.device_id)
    assert "rate_limited" in {row["event"] for row in events}


async def test_a_flooding_device_is_blocked_at_the_broker_and_let_back(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings, db: asyncpg.Connection
) -> None:
    flooder = await enrol_device("flood")
    bystander = await enrol_device("calm")
    async with raw_device(settings.broker.mqtt_host, settings.broker.mqtt_port, flooder) as device:
        topic = protocol.request_topic(flooder.device_id, METHOD_TASKS_NEXT)
        body = orjson.dumps({"id": uuid.uuid4().hex, "params": {}})
        with contextlib.suppress(aiomqtt.MqttError):  # the broker closes the connection mid-flood
            for _ in range(FLOOD // FLOOD_WINDOW):
                # Many in flight, as fast as the connection takes them (one at a time is slower).
                await asyncio.gather(*(device.client.publish(topic, body, qos=0) for _ in range(FLOOD_WINDOW)))

    # Shut out at the broker: the record says until when, and a new connection is refused.
    await eventually(lambda: _blocked(app_client, flooder.device_id), within_s=30)
    assert await refused_code(settings, flooder, flooder.device_id) == NOT_AUTHORISED
    events = await db.fetch("SELECT event FROM device_events WHERE device_id = $1", flooder.device_id)
    assert "blocked" in {row["event"] for row in events}

    # Another device was never limited and is answered meanwhile.
    async with raw_device(settings.broker.mqtt_host, settings.broker.mqtt_port, bystander) as calm:
        assert "result" in await calm.call(METHOD_TASKS_NEXT, within_s=30)
    assert (await device_record(app_client, bystander.device_id))["last_limited_at"] is None

    # The block runs out (the tests' block_s is short) and the device may connect again.
    await eventually(lambda: _unblocked(app_client, flooder.device_id), within_s=60)
    assert await refused_code(settings, flooder, flooder.device_id) is None


async def _blocked(app_client: httpx.AsyncClient, device_id: str) -> bool:
    return (await device_record(app_client, device_id))["blocked_until"] is not None


async def _unblocked(app_client: httpx.AsyncClient, device_id: str) -> bool:
    return not await _blocked(app_client, device_id)


async def test_one_certificate_holds_one_mqtt_connection(enrol_device: EnrolDevice, settings: Settings) -> None:
    creds = await enrol_device("conn")
    # RabbitMQ 4 binds the client id to the certificate: no second id for the same certificate ...
    assert await refused_code(settings, creds, "second") == CLIENT_ID_NOT_VALID
    # ... and a second connection under the device's id takes the first one's place: never two at once.
    admin = BrokerAdmin.from_settings(settings.broker)
    try:
        with contextlib.suppress(aiomqtt.MqttError):  # the first connection is closed by the takeover
            async with (
                mqtt_connection(settings, creds, creds.device_id),
                mqtt_connection(settings, creds, creds.device_id),
            ):

                async def one_connection() -> bool:
                    return await admin.device_connection_count(creds.device_id) == 1

                await eventually(one_connection, within_s=30)
        # The user limit (max-connections) also caps what the certificate may open over AMQPS.
        broker = settings.broker
        auth = (broker.management_user, broker.management_password.get_secret_value())
        async with httpx.AsyncClient(base_url=broker.management_url, auth=auth) as management:
            limits = (await management.get(f"/api/user-limits/{creds.device_id}")).json()
        assert limits[0]["value"] == {"max-connections": broker.device_max_connections}
    finally:
        await admin.aclose()
    await eventually(lambda: _accepted(settings, creds), within_s=30)


async def _accepted(settings: Settings, creds: DeviceCredentials) -> bool:
    return await refused_code(settings, creds, creds.device_id) is None


async def test_a_reconnect_storm_is_blocked(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings, db: asyncpg.Connection
) -> None:
    creds = await enrol_device("storm")
    # Until a connect is refused: the bucket refills while the storm goes on (a third of a connect
    # a second), and on a busy box a connect takes long enough that its burst plus a few is not past it.
    for _ in range(4 * settings.device_limits.connects_per_window):
        if await refused_code(settings, creds, creds.device_id) is not None:
            break  # blocked
    await eventually(lambda: _blocked(app_client, creds.device_id), within_s=30)
    assert await refused_code(settings, creds, creds.device_id) == NOT_AUTHORISED
    kinds = await db.fetch("SELECT event FROM device_events WHERE device_id = $1", creds.device_id)
    assert "blocked" in {row["event"] for row in kinds}
    await eventually(lambda: _unblocked(app_client, creds.device_id), within_s=60)


async def test_the_sdk_in_a_hurry_stays_under_the_limits(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds = await enrol_device("sdk")
    async with running(make_device(settings, creds)) as device:
        # Twice the core's burst at once: the SDK's own pace spreads them.
        calls = [device.call(METHOD_STATE, {"reported": {"n": n}}) for n in range(2 * settings.device_limits.burst)]
        answers = await asyncio.gather(*calls)
    assert all(answer == {"ok": True} for answer in answers)
    assert device._rpc.rate_limited == 0
    assert (await device_record(app_client, creds.device_id))["last_limited_at"] is None
