"""A request the device sends again with the same id is handled once (decision 22).

The SDK re-sends an unanswered request after 10 s; under load the copies queue up behind the
first. This test registers a handler that waits until released, on the real broker with the
DeviceRpcRouter the app uses, and sends copies from a real MQTT device: one while the first is
being handled (acknowledged without a reply), one after it was answered (the same reply again).
"""

from __future__ import annotations

import asyncio

import httpx

from app import metrics
from app.device_rpc import DeviceRequest
from app.settings import Settings
from swarm_device.protocol import WireModel
from tests.conftest import EnrolDevice
from tests.polling import eventually
from tests.raw_device import raw_device
from tests.standalone_rpc import StandaloneRpc

METHOD = "test/copies"


class Empty(WireModel):
    pass


class Handled(WireModel):
    times: int


def copies_seen() -> float:
    return metrics.REGISTRY.get_sample_value("swarm_device_request_copies_total", {"handler": "slow_once"}) or 0.0


async def test_copies_of_a_request_are_answered_without_handling_it_again(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds = await enrol_device("copies")
    served = StandaloneRpc(settings, "copies")
    handled: list[str] = []
    started, release = asyncio.Event(), asyncio.Event()

    @served.method(METHOD, Empty)
    async def slow_once(request: DeviceRequest[Empty]) -> Handled:
        handled.append(request.request_id)
        started.set()
        await release.wait()
        return Handled(times=handled.count(request.request_id))

    async with served, raw_device(settings.broker.mqtt_host, settings.broker.mqtt_port, creds) as dev:
        before = copies_seen()
        request = b'{"id": "c1", "params": {}}'
        await dev.send(METHOD, request)
        async with asyncio.timeout(10):
            await started.wait()
        # A copy while the first is being handled: taken off the queue, not handled.
        await dev.send(METHOD, request)
        await eventually(lambda: copies_seen() == before + 1)
        release.set()
        first = await dev.reply_to("c1")
        assert first == {"id": "c1", "result": {"times": 1}}
        # A copy after the answer: the same reply again, still from one handling.
        await dev.send(METHOD, request)
        assert await dev.reply_to("c1") == first
        assert copies_seen() == before + 2
        # Another id is a new request.
        await dev.send(METHOD, b'{"id": "c2", "params": {}}')
        assert await dev.reply_to("c2") == {"id": "c2", "result": {"times": 1}}
        assert handled == ["c1", "c2"]
        assert dev.replies["c1"].empty()
