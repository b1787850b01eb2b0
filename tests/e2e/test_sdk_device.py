"""The spine with the device SDK: real TLS MQTT to RabbitMQ, the app in-process, PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from app.settings import Settings
from swarm_device.client import DeviceClient, ProtocolPreference
from swarm_device.tasks import TaskContext, TaskRejected
from tests.conftest import DeviceCredentials, EnrolDevice

DeviceFactory = Callable[[DeviceCredentials], DeviceClient]
#: The core scenarios run with both MQTT versions the SDK speaks (`protocol` of DeviceClient).
MQTT_VERSIONS = pytest.mark.parametrize("mqtt_version", ["5", "3.1.1"])


def make_device(
    settings: Settings, creds: DeviceCredentials, mqtt_version: ProtocolPreference = "5", session_expiry: int = 86400
) -> DeviceClient:
    device = DeviceClient(
        creds.device_id,
        settings.broker.mqtt_host,
        settings.broker.mqtt_port,
        creds.ca_file,
        creds.cert_file,
        creds.key_file,
        firmware="1.2.3",
        model="sim",
        capabilities=["echo"],
        protocol=mqtt_version,
        session_expiry=session_expiry,
        request_timeout=5.0,
    )

    @device.task_handler("echo")
    async def echo(ctx: TaskContext) -> dict[str, Any]:
        await ctx.progress({"step": "echoing"})
        return dict(ctx.params)

    @device.task_handler("refuse")
    async def refuse(ctx: TaskContext) -> None:
        raise TaskRejected("not today")

    return device


@asynccontextmanager
async def running(device: DeviceClient) -> AsyncIterator[DeviceClient]:
    async with device:
        await asyncio.wait_for(device.ready.wait(), 20)
        yield device


async def wait_final(client: httpx.AsyncClient, task_id: str, seconds: float = 20) -> dict[str, Any]:
    response = await client.get(f"/tasks/{task_id}", params={"wait": seconds})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@MQTT_VERSIONS
async def test_round_trip_through_the_sdk(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings, mqtt_version: ProtocolPreference
) -> None:
    creds = await enrol_device("sdk")
    async with running(make_device(settings, creds, mqtt_version)) as device:
        assert device.device is not None
        assert device.device.firmware == "1.2.3"
        created = await app_client.post(
            f"/devices/{creds.device_id}/tasks", json={"method": "echo", "params": {"n": 42}}
        )
        assert created.status_code == 201
        task = await wait_final(app_client, created.json()["id"])

    assert task["status"] == "succeeded"
    assert task["result"] == {"n": 42}
    assert task["attempt"] == 1
    events = (await app_client.get(f"/tasks/{task['id']}/events")).json()
    statuses = [e["status"] for e in events]
    # Every change is recorded, in order, one version at a time.
    assert [e["version"] for e in events] == list(range(1, len(events) + 1))
    assert statuses[0] == "queued"
    assert "in_progress" in statuses
    assert statuses[-1] == "succeeded"
    assert any(e["details"] and e["details"].get("status_details") == {"step": "echoing"} for e in events)

    record = (await app_client.get(f"/devices/{creds.device_id}")).json()
    assert record["firmware"] == "1.2.3"
    assert record["capabilities"] == ["echo"]


@MQTT_VERSIONS
async def test_task_created_while_offline_is_delivered_on_connect(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings, mqtt_version: ProtocolPreference
) -> None:
    creds = await enrol_device("off")
    first = await app_client.post(f"/devices/{creds.device_id}/tasks", json={"method": "echo", "params": {"i": 1}})
    urgent = await app_client.post(
        f"/devices/{creds.device_id}/tasks", json={"method": "echo", "params": {"i": 2}, "priority": 10}
    )
    refused = await app_client.post(f"/devices/{creds.device_id}/tasks", json={"method": "refuse"})
    unknown = await app_client.post(f"/devices/{creds.device_id}/tasks", json={"method": "no-such-method"})
    assert all(r.status_code == 201 for r in (first, urgent, refused, unknown))
    assert (await app_client.get(f"/tasks/{first.json()['id']}")).json()["status"] == "queued"

    async with running(make_device(settings, creds, mqtt_version)):
        results = [await wait_final(app_client, r.json()["id"]) for r in (first, urgent, refused, unknown)]

    assert [r["status"] for r in results] == ["succeeded", "succeeded", "rejected", "rejected"]
    # Priority first, then age: the urgent task started before the older one.
    started = {}
    for r in results[:2]:
        events = (await app_client.get(f"/tasks/{r['id']}/events")).json()
        started[r["params"]["i"]] = next(e["created_at"] for e in events if e["status"] == "in_progress")
    assert started[2] < started[1]
