"""The spine with a stock MQTT client (mosquitto) acting as the device: no SDK involved."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest

from app.settings import Settings
from swarm_device import protocol
from tests.conftest import EnrolDevice
from tests.mosquitto import Endpoint, request, subscriber


@pytest.fixture
def endpoint(settings: Settings) -> Endpoint:
    return Endpoint(settings.broker.mqtt_host, settings.broker.mqtt_port, settings.broker.ca_file)


async def test_round_trip_with_mosquitto_as_the_device(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, endpoint: Endpoint
) -> None:
    device = await enrol_device("mq")
    dev = device.device_id
    topics = [protocol.notify_topic(dev), protocol.reply_topic(dev)]

    # The client id is bound to the certificate: a device has one connection at a time, so it
    # listens for its notice, then calls the core over MQTT 5 request/response (mosquitto_rr).
    async def call(method: str, request_id: str, params: dict[str, object]) -> dict[str, Any]:
        body = orjson.dumps({"id": request_id, "params": params})
        code, output = await request(
            endpoint, device.cert_file, device.key_file, dev, protocol.request_topic(dev, method), answers, body
        )
        assert code == 0, output
        reply: dict[str, Any] = orjson.loads(output)
        assert reply["id"] == request_id
        return reply

    answers = f"dev/{dev}/down/answers"
    async with subscriber(endpoint, device.cert_file, device.key_file, dev, topics, clean_session=True) as sub:
        await sub.wait_subscribed()

        created = await app_client.post(f"/devices/{dev}/tasks", json={"method": "reboot", "params": {"delay": 1}})
        assert created.status_code == 201, created.text
        task_id = created.json()["id"]

        notice = await sub.next_json(protocol.notify_topic(dev))
        assert notice == {"event": "task_queued", "task_id": task_id}

    reply = await call(protocol.METHOD_TASKS_NEXT, "n1", {})
    assert reply["result"]["id"] == task_id
    assert reply["result"]["status"] == "in_progress"
    assert reply["result"]["params"] == {"delay": 1}

    reply = await call(protocol.result_method(task_id), "r1", {"status": "succeeded", "result": {"ok": True}})
    assert reply["result"]["status"] == "succeeded"

    final = await app_client.get(f"/tasks/{task_id}", params={"wait": 5})
    assert final.json()["status"] == "succeeded"
    assert final.json()["result"] == {"ok": True}

    # Malformed JSON gets an `invalid` answer, and the same consumer keeps serving afterwards.
    code, output = await request(
        endpoint,
        device.cert_file,
        device.key_file,
        dev,
        protocol.request_topic(dev, protocol.METHOD_TASKS_NEXT),
        answers,
        b"{this is not json",
    )
    assert code == 0, output
    broken = orjson.loads(output)
    assert broken["id"] is None
    assert broken["error"]["code"] == "invalid"

    reply = await call(protocol.METHOD_TASKS_NEXT, "n2", {})
    assert reply == {"id": "n2", "result": None}

    unknown = uuid.uuid4()
    reply = await call(protocol.result_method(unknown), "r2", {"status": "succeeded"})
    assert reply["error"]["code"] == "not_found"

    not_a_uuid = await call(protocol.result_method("nope"), "r3", {"status": "succeeded"})
    assert not_a_uuid["error"]["code"] == "not_found"
