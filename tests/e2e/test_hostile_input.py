"""Hostile device input against the real broker: every message is answered, no consumer dies.

The device is a bare MQTT client (tests/raw_device.py) publishing exactly the bytes under test;
the consumers are the app's real FastStream subscribers on RabbitMQ's quorum queues.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import orjson

from app.device_rpc import MAX_REQUEST_BYTES
from app.settings import Settings
from swarm_device import protocol
from tests.conftest import EnrolDevice
from tests.management import core_broker, dead_letter_count, rpc_consumers, wait_for_consumers
from tests.raw_device import raw_device

RESULT = "tasks/{task_id}/result"
PROGRESS = "tasks/{task_id}/progress"
METHODS = (protocol.METHOD_HELLO, protocol.METHOD_TASKS_NEXT, protocol.METHOD_STATE, RESULT, PROGRESS)
BROKEN_BODIES: list[tuple[bytes, bool]] = [
    # (body, whether the reply can carry the request id "h")
    (b"{not json", False),
    (b"", False),
    (b"\xff\xfe\x00garbage", False),
    (b"[]", False),
    (b'"a string"', False),
    (b"null", False),
    (b"12345", False),
    (b'{"params": {}}', False),
    (b'{"id": 7, "params": {}}', False),
    (b'{"id": "' + b"x" * 65 + b'", "params": {}}', False),
    (b'{"id": "h", "params": []}', True),
    (b'{"id": "h", "params": "nope"}', True),
    (b'{"id": "h", "params": {"s": "nul \\u0000 inside"}}', True),
    (b'{"id": "h", "params": {"\\u0000": 1}}', True),
    (b'{"id": "h", "params": {"deep": ' + b"[" * 5000 + b"]" * 5000 + b"}}", False),
    (orjson.dumps({"id": "h", "params": {"blob": "x" * (1024 * 1024)}}), False),
]
# Per method, params of the wrong types: answered `invalid` with the request id.
WRONG_TYPES: dict[str, dict[str, Any]] = {
    protocol.METHOD_HELLO: {"firmware": ["1.0"], "capabilities": "all"},
    protocol.METHOD_STATE: {"reported": [1, 2]},
    RESULT: {"status": "done"},
    PROGRESS: {"status_details": "half way"},
}


def topic_method(method: str, task_id: str) -> str:
    return method.format(task_id=task_id)


async def test_every_hostile_message_is_answered_and_every_consumer_lives(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds = await enrol_device("hostile")
    other = await enrol_device("victim")
    foreign = (await app_client.post(f"/devices/{other.device_id}/tasks", json={"method": "secret"})).json()
    before = await wait_for_consumers(settings.broker, 1)
    async with core_broker(settings.broker) as broker:
        parked_before = await dead_letter_count(broker)
    assert len(before) >= len(METHODS)

    sent = 0
    async with raw_device(settings.broker.mqtt_host, settings.broker.mqtt_port, creds) as dev:

        async def expect_error(method: str, body: bytes, request_id: str | None, code: str) -> None:
            nonlocal sent
            await dev.send(method, body)
            sent += 1
            reply = await dev.reply_to(request_id)
            assert reply.get("error", {}).get("code") == code, (method, body[:80], reply)

        task_id = str(uuid.uuid4())
        for method in METHODS:
            for body, has_id in BROKEN_BODIES:
                await expect_error(topic_method(method, task_id), body, "h" if has_id else None, "invalid")
        for method, params in WRONG_TYPES.items():
            body = orjson.dumps({"id": "w", "params": params})
            await expect_error(topic_method(method, task_id), body, "w", "invalid")

        # Unknown, malformed and foreign task ids: all `not_found`, the other device's task untouched.
        for bad_id in (str(uuid.uuid4()), "not-a-uuid", "x" * 200, foreign["id"]):
            for method, params in ((RESULT, {"status": "succeeded"}), (PROGRESS, {"status_details": {}})):
                body = orjson.dumps({"id": "u", "params": params})
                await expect_error(topic_method(method, bad_id), body, "u", "not_found")
        untouched = (await app_client.get(f"/tasks/{foreign['id']}")).json()
        assert (untouched["status"], untouched["version"]) in {("queued", 1), ("sent", 2)}

        # Out of order: a result and a progress before the task was handed out, after it was final.
        task = (await app_client.post(f"/devices/{creds.device_id}/tasks", json={"method": "m"})).json()
        for method, params in ((RESULT, {"status": "succeeded"}), (PROGRESS, {"status_details": {}})):
            await expect_error(
                topic_method(method, task["id"]), orjson.dumps({"id": "o", "params": params}), "o", "conflict"
            )
        handed = await dev.result(protocol.METHOD_TASKS_NEXT)
        assert handed["id"] == task["id"]
        report = {"status": "succeeded", "result": {"n": 1}}
        # Duplicates of the final report, several at once: each one answered with the same task.
        replies = await asyncio.gather(*(dev.call(topic_method(RESULT, task["id"]), report) for _ in range(5)))
        assert {orjson.dumps(r["result"]) for r in replies} == {orjson.dumps(replies[0]["result"])}
        assert replies[0]["result"]["status"] == "succeeded"
        await expect_error(topic_method(PROGRESS, task["id"]), b'{"id": "late", "params": {}}', "late", "conflict")
        await expect_error(
            topic_method(RESULT, task["id"]), b'{"id": "other", "params": {"status": "failed"}}', "other", "conflict"
        )
        # The same consumers still serve ordinary requests.
        assert (await dev.result(protocol.METHOD_TASKS_NEXT)) is None
        assert (await dev.result(protocol.METHOD_HELLO, {"firmware": "ok"}))["firmware"] == "ok"
        assert "result" in await dev.call(protocol.METHOD_STATE, {"reported": {"ok": True}})

    final = (await app_client.get(f"/tasks/{task['id']}")).json()
    assert (final["status"], final["result"], final["version"]) == (
        "succeeded",
        {"n": 1},
        replies[0]["result"]["version"],
    )
    # Nothing was parked: every one of them was answered.
    async with core_broker(settings.broker) as broker:
        assert await dead_letter_count(broker) == parked_before
    after = await rpc_consumers(settings.broker)
    assert {name: count >= 1 for name, count in after.items()} == dict.fromkeys(before, True)
    print(f"\nhostile input: {sent} bad messages, each answered, none parked; consumers per queue {after}")


def body_of_length(length: int) -> bytes:
    empty = orjson.dumps({"id": "s", "params": {"reported": {"blob": ""}}})
    return orjson.dumps({"id": "s", "params": {"reported": {"blob": "x" * (length - len(empty))}}})


async def test_the_size_limit_is_exact(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds = await enrol_device("size")
    async with raw_device(settings.broker.mqtt_host, settings.broker.mqtt_port, creds) as dev:
        await dev.send(protocol.METHOD_STATE, body_of_length(MAX_REQUEST_BYTES))
        assert (await dev.reply_to("s")) == {"id": "s", "result": {"ok": True}}
        await dev.send(protocol.METHOD_STATE, body_of_length(MAX_REQUEST_BYTES + 1))
        assert (await dev.reply_to(None))["error"]["code"] == "invalid"
