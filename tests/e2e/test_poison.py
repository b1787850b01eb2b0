"""A message that keeps failing is retried a bounded number of times, answered, and parked.

No input makes the app's own handlers fail unexpectedly (the hostile-input suite shows every bad
message answered), so this test registers a handler that always raises on the real broker, with
the same DeviceRpcRouter the app uses, and sends to it from a real MQTT device.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
from faststream.rabbit import RabbitBroker

from app.broker import DEAD_LETTER_QUEUE
from app.device_rpc import DELIVERY_LIMIT, DeviceRequest
from app.settings import Settings
from swarm_device.protocol import WireModel
from tests.conftest import EnrolDevice
from tests.management import dead_letter_count
from tests.raw_device import raw_device
from tests.standalone_rpc import StandaloneRpc

METHOD = "test/poison"


class Empty(WireModel):
    pass


async def parked_message_of(broker: RabbitBroker, routing_key: str) -> dict[str, object]:
    """Take the dead letter with this routing key out of the queue; others are put back."""
    queue = await broker.declare_queue(DEAD_LETTER_QUEUE)
    others = []
    try:
        while (message := await queue.get(no_ack=False, fail=False, timeout=5)) is not None:
            if message.routing_key == routing_key:
                await message.ack()
                return dict(message.headers)
            others.append(message)
    finally:
        for other in others:
            await other.nack(requeue=True)
    raise AssertionError(f"no dead letter with routing key {routing_key}")


async def test_a_failing_message_is_retried_answered_and_dead_lettered(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds = await enrol_device("poison")
    served = StandaloneRpc(settings, "poison")
    broker = served.broker
    calls: Counter[str] = Counter()

    @served.method(METHOD, Empty)
    async def always_fails(request: DeviceRequest[Empty]) -> None:
        calls[request.request_id] += 1
        raise RuntimeError("a bug in the handler")

    async with served, raw_device(settings.broker.mqtt_host, settings.broker.mqtt_port, creds) as dev:
        parked_before = await dead_letter_count(broker)
        for request_id in ("p1", "p2"):
            await dev.send(METHOD, b'{"id": "%s", "params": {}}' % request_id.encode())
            reply = await dev.reply_to(request_id, within_s=20)
            # Answered once, after the last delivery, and tried exactly the bounded number of times.
            assert reply["error"]["code"] == "internal"
            assert calls[request_id] == DELIVERY_LIMIT
        # The consumer is still there after both: a third message is tried again from scratch.
        await dev.send(METHOD, b'{"id": "p3", "params": {}}')
        assert (await dev.reply_to("p3", within_s=20))["error"]["code"] == "internal"
        assert calls == {"p1": DELIVERY_LIMIT, "p2": DELIVERY_LIMIT, "p3": DELIVERY_LIMIT}
        # The reply goes out just before the reject: give the broker a moment to park the last.
        async with asyncio.timeout(10):
            while True:
                if await dead_letter_count(broker) == parked_before + 3:
                    break
                await asyncio.sleep(0.2)
        routing_key = f"dev.{creds.device_id}.up.rpc.test.poison"
        for _ in range(3):
            headers = await parked_message_of(broker, routing_key)
            assert "x-death" in headers or "x-first-death-reason" in headers, headers
