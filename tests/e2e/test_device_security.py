"""Device identity and broker-enforced confinement (issue 3): RabbitMQ, not the core's goodwill,
keeps every device inside its own topics. Stock mosquitto clients act as the devices."""

from __future__ import annotations

import asyncio
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from app import pki
from app.db import create_engine, create_sessionmaker
from app.devices import service as devices
from app.devices.broker_admin import BrokerAdmin
from app.settings import Settings
from swarm_device import protocol
from swarm_device.client import ProtocolPreference
from swarm_device.tasks import TaskContext
from tests.conftest import ROOT, DeviceCredentials, EnrolDevice, unique_device_id
from tests.e2e.test_sdk_device import MQTT_VERSIONS, make_device, running
from tests.mosquitto import Endpoint, publish, subscriber
from tests.polling import eventually

# mosquitto_pub exit codes seen with RabbitMQ 3.10 and 4.0 (MQTT 3.1.1 has no reason codes on PUBACK).
CONNECTION_LOST = 7  # the broker closed the connection instead of acknowledging the publish


@pytest.fixture
def endpoint(settings: Settings) -> Endpoint:
    return Endpoint(settings.broker.mqtt_host, settings.broker.mqtt_port, settings.broker.ca_file)


def management(settings: Settings) -> httpx.AsyncClient:
    auth = (settings.broker.management_user, settings.broker.management_password.get_secret_value())
    return httpx.AsyncClient(base_url=settings.broker.management_url, auth=auth, timeout=10)


async def broker_state(settings: Settings, device_id: str) -> list[Any]:
    vhost = settings.broker.devices_vhost
    async with management(settings) as api:
        paths = [f"/api/users/{device_id}", f"/api/permissions/{vhost}/{device_id}"]
        answers = [await api.get(path) for path in paths]
        topic_permissions = await api.get(f"/api/vhosts/{vhost}/topic-permissions")
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    mine = [p for p in topic_permissions.json() if p["user"] == device_id]
    return [a.json() for a in answers] + [mine]


async def test_device_cannot_publish_into_another_devices_topics(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, endpoint: Endpoint
) -> None:
    mallory = await enrol_device("mal")
    alice = await enrol_device("ali")
    created = await app_client.post(f"/devices/{alice.device_id}/tasks", json={"method": "reboot"})
    task_id = created.json()["id"]

    async with subscriber(
        endpoint, alice.cert_file, alice.key_file, alice.device_id, protocol.down_topics(alice.device_id)
    ) as alice_sub:
        await alice_sub.wait_subscribed()
        # Mallory forges a notice to Alice and a result for Alice's task: both refused by the broker.
        # The forged notice names a task of its own: the core's genuine notice for Alice's task may
        # still arrive while she listens (the notifier sends after the commit, off the request).
        forged_task_id = str(uuid.uuid4())
        forged = [
            (protocol.notify_topic(alice.device_id), {"event": "task_queued", "task_id": forged_task_id}),
            (
                protocol.request_topic(alice.device_id, protocol.result_method(task_id)),
                {"id": "x", "params": {"status": "succeeded"}},
            ),
            (protocol.request_topic(alice.device_id, protocol.METHOD_TASKS_NEXT), {"id": "y", "params": {}}),
        ]
        for topic, body in forged:
            code, output = await publish(
                endpoint, mallory.cert_file, mallory.key_file, mallory.device_id, topic, orjson.dumps(body)
            )
            assert code == CONNECTION_LOST, output
        await asyncio.sleep(1)
        received = [alice_sub.messages.get_nowait() for _ in range(alice_sub.messages.qsize())]
        assert not [m for m in received if forged_task_id.encode() in m[1]], "Alice received what Mallory sent"

    task = (await app_client.get(f"/tasks/{task_id}")).json()
    assert task["status"] in ("queued", "sent"), "the forged tasks/next or result reached the core"
    assert task["attempt"] == 0


async def test_device_cannot_subscribe_to_another_devices_topics(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, endpoint: Endpoint
) -> None:
    mallory = await enrol_device("mal")
    alice = await enrol_device("ali")
    for topics in ([protocol.notify_topic(alice.device_id)], ["dev/+/down/notify"], ["#"]):
        async with subscriber(
            endpoint, mallory.cert_file, mallory.key_file, mallory.device_id, topics, clean_session=True
        ) as eavesdropper:
            await app_client.post(f"/devices/{alice.device_id}/tasks", json={"method": "reboot"})
            await asyncio.sleep(1.5)
            assert eavesdropper.messages.empty()
            # RabbitMQ 4.0 answers SUBACK with the failure code (0x80 on 3.1.1) and then closes
            # the connection.
            assert "Subscribed (mid: 1): 128" in eavesdropper.debug, eavesdropper.debug


async def test_client_id_of_another_device_is_refused_and_its_session_kept(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, endpoint: Endpoint
) -> None:
    mallory = await enrol_device("mal")
    alice = await enrol_device("ali")
    topics = [protocol.notify_topic(alice.device_id)]
    # Alice has a persistent session; while she is offline a notice waits in it.
    async with subscriber(endpoint, alice.cert_file, alice.key_file, alice.device_id, topics) as first:
        await first.wait_subscribed()
    created = await app_client.post(f"/devices/{alice.device_id}/tasks", json={"method": "reboot"})
    await asyncio.sleep(1)

    async with subscriber(endpoint, mallory.cert_file, mallory.key_file, alice.device_id, topics) as impostor:
        await asyncio.sleep(2)
        assert not impostor.subscribed.is_set()
        assert impostor.messages.empty()
    # CONNACK 2 ("identifier rejected"): the client id is not Mallory's certificate's DNS SAN.
    assert any("received CONNACK (2)" in line for line in impostor.debug), impostor.debug

    async with subscriber(endpoint, alice.cert_file, alice.key_file, alice.device_id, topics) as again:
        notice = await again.next_json(protocol.notify_topic(alice.device_id))
    assert notice["task_id"] == created.json()["id"]


async def _connect_exit_code(
    endpoint: Endpoint, cert: Path | None, key: Path | None, client_id: str
) -> tuple[int, str]:
    return await publish(endpoint, cert, key, client_id, f"dev/{client_id}/up/rpc/hello", b'{"id":"h","params":{}}')


async def test_connections_without_a_valid_identity_are_refused(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, endpoint: Endpoint, settings: Settings, tmp_path: Path
) -> None:
    # No certificate at all: the TLS handshake fails (fail_if_no_peer_cert).
    code, output = await _connect_exit_code(endpoint, None, None, "nobody")
    assert code != 0, output

    # A certificate from another CA, with the CN of a real device.
    real = await enrol_device("real")
    foreign = tmp_path / "foreign"
    for args in (["ca", str(foreign)], ["client", str(foreign), real.device_id, real.device_id]):
        await asyncio.to_thread(subprocess.run, [str(ROOT / "pki" / "pki.sh"), *args], check=True, capture_output=True)
    code, output = await _connect_exit_code(
        endpoint, foreign / f"{real.device_id}.crt", foreign / f"{real.device_id}.key", real.device_id
    )
    assert code != 0, output

    # Our CA, but a CN that is no enrolled device: no broker user.
    ghost = unique_device_id("ghost")
    ca = pki.load_ca_files(settings.pki.ca_cert_file, settings.pki.ca_key_file)
    key_pem, cert = pki.issue_device_credentials(ca, ghost, days=1)
    (tmp_path / "ghost.key").write_bytes(key_pem)
    (tmp_path / "ghost.crt").write_bytes(pki.certificate_pem(cert))
    code, output = await _connect_exit_code(endpoint, tmp_path / "ghost.crt", tmp_path / "ghost.key", ghost)
    assert code != 0, output
    assert "Connection Refused" in output or "not authorised" in output.lower(), output

    # The genuine device, for contrast, gets in.
    code, output = await _connect_exit_code(endpoint, real.cert_file, real.key_file, real.device_id)
    assert code == 0, output


async def create_task(client: httpx.AsyncClient, device_id: str, method: str) -> str:
    # A long timeout: a slow box must not time the held task out before the revocation.
    body = {"method": method, "timeout_s": 600, "max_attempts": 1}
    created = await client.post(f"/devices/{device_id}/tasks", json=body)
    assert created.status_code == 201, created.text
    task_id: str = created.json()["id"]
    return task_id


async def task_status(client: httpx.AsyncClient, task_id: str) -> str:
    status: str = (await client.get(f"/tasks/{task_id}")).json()["status"]
    return status


@MQTT_VERSIONS
async def test_revocation_cuts_the_device_off(
    app_client: httpx.AsyncClient,
    enrol_device: EnrolDevice,
    endpoint: Endpoint,
    settings: Settings,
    mqtt_version: ProtocolPreference,
) -> None:
    creds = await enrol_device("rev")
    device = make_device(settings, creds, mqtt_version)

    # The device holds its task in progress until it is canceled: revocation cannot race its finish.
    @device.task_handler("hold")
    async def hold(_ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    async with running(device):
        held = await create_task(app_client, creds.device_id, "hold")

        async def held_in_progress() -> bool:
            return await task_status(app_client, held) == "in_progress"

        await eventually(held_in_progress, within_s=30)
        # A second task queued behind the held one.
        waiting = await create_task(app_client, creds.device_id, "echo")
        revoked = await app_client.delete(f"/devices/{creds.device_id}")
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["revoked_at"] is not None
        # Its open connection is closed by the broker.
        await eventually(lambda: not device.connected.is_set())

    for task_id in (held, waiting):
        assert await task_status(app_client, task_id) == "canceled"
    code, output = await _connect_exit_code(endpoint, creds.cert_file, creds.key_file, creds.device_id)
    assert code != 0, output
    # A revoked device takes no new tasks and its id is not reused.
    assert (await app_client.post(f"/devices/{creds.device_id}/tasks", json={"method": "x"})).status_code == 404
    assert (await app_client.post("/devices", json={"id": creds.device_id})).status_code == 409


async def test_provisioning_twice_leaves_the_same_broker_state(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds: DeviceCredentials = await enrol_device("twice")
    before = await broker_state(settings, creds.device_id)
    again = await app_client.post("/devices", json={"id": creds.device_id})
    assert again.status_code == 200
    assert await broker_state(settings, creds.device_id) == before
    user, permissions, topic_permissions = before
    assert user["password_hash"] == ""  # certificate login only
    assert "{username}" in topic_permissions[0]["write"]
    # Queues pinned to the device's own MQTT session, so no one else can resume it.
    assert permissions["configure"] == f"^mqtt-subscription-{re.escape(creds.device_id)}qos[01]$"


@pytest.mark.parametrize("bad_id", ["a.b", "a/b", "a+b", "a#b", "a b", "dev-*", "x" * 65, "é", ".*"])
async def test_device_ids_with_topic_or_regex_metacharacters_are_refused(
    app_client: httpx.AsyncClient, bad_id: str
) -> None:
    response = await app_client.post("/devices", json={"id": bad_id})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"][0]["loc"] == ["body", "id"]


@MQTT_VERSIONS
async def test_presence_follows_the_connection(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings, mqtt_version: ProtocolPreference
) -> None:
    creds = await enrol_device("pres")

    async def online() -> bool:
        return bool((await app_client.get(f"/devices/{creds.device_id}")).json()["online"])

    async def offline() -> bool:
        return not await online()

    assert await offline()
    async with running(make_device(settings, creds, mqtt_version)):
        await eventually(online)
        listed = (await app_client.get("/devices", params={"online": "true", "limit": 1000})).json()["items"]
        assert creds.device_id in {d["id"] for d in listed}
    await eventually(offline)
    record = (await app_client.get(f"/devices/{creds.device_id}")).json()
    assert record["last_seen_at"] is not None


async def test_start_up_reconciliation_repairs_the_broker(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    lost = await enrol_device("lost")
    revoked = await enrol_device("gone")
    await app_client.delete(f"/devices/{revoked.device_id}")
    before = await broker_state(settings, lost.device_id)
    admin = BrokerAdmin.from_settings(settings.broker)
    engine = create_engine(settings.database)
    try:
        # The broker lost one user and kept a revoked one (e.g. restored from an old backup).
        await admin.deprovision_device(lost.device_id)
        await admin.provision_device(revoked.device_id)
        provisioned, removed = await devices.reconcile_broker_users(create_sessionmaker(engine), admin)
        assert provisioned >= 1
        assert removed >= 1
        assert await admin.device_provisioned(lost.device_id)
        assert not await admin.device_provisioned(revoked.device_id)
    finally:
        await admin.aclose()
        await engine.dispose()
    assert await broker_state(settings, lost.device_id) == before
