"""DeviceClient wiring without a broker: a fake MQTT connection stands in for aiomqtt's client."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import orjson
import pytest

from swarm_device import DeviceClient, TaskContext
from swarm_device.client import _cancel_until_done


class FakeCore:
    """Plays the broker and the core: answers requests by dispatching replies to the device."""

    def __init__(self, device: DeviceClient) -> None:
        self.device = device
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.tasks: list[dict[str, Any]] = []

    async def publish(self, topic: str, payload: bytes, qos: int = 0, properties: Any = None) -> None:
        assert qos == 1
        method = topic.removeprefix(f"dev/{self.device.device_id}/up/rpc/")
        body = orjson.loads(payload)
        self.requests.append((method, body["params"]))
        result: Any = {}
        if method == "hello":
            result = {"id": self.device.device_id, "online": True}
        elif method == "tasks/next":
            result = self.tasks[0] if self.tasks else None
        elif method.endswith("/result"):
            self.tasks = [t for t in self.tasks if not method.startswith(f"tasks/{t['id']}/")]
        self.deliver("rpc", orjson.dumps({"id": body["id"], "result": result}))

    def deliver(self, kind: str, payload: bytes) -> None:
        topic = f"dev/{self.device.device_id}/down/{kind}"
        message = aiomqtt.Message(topic, payload, qos=1, retain=False, mid=1, properties=None)
        asyncio.get_running_loop().call_soon(self.device._dispatch, message)

    def methods(self) -> list[str]:
        return [method for method, _ in self.requests]


def make_task(method: str, params: dict[str, Any]) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat()
    return {
        "id": str(uuid.uuid4()),
        "device_id": "dev-1",
        "method": method,
        "params": params,
        "status": "in_progress",
        "priority": 0,
        "attempt": 1,
        "max_attempts": 1,
        "version": 1,
        "created_at": now,
        "updated_at": now,
    }


def make_client(**options: Any) -> DeviceClient:
    return DeviceClient(
        "dev-1", "127.0.0.1", 1, "/nonexistent/ca.crt", "/nonexistent/d.crt", "/nonexistent/d.key", **options
    )


async def until(condition: Any, limit: float = 5.0) -> None:
    """Poll a condition on the client's state (no event exists for most of them)."""
    async with asyncio.timeout(limit):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.001)


@pytest.fixture
def wired() -> tuple[DeviceClient, FakeCore]:
    client = make_client()
    core = FakeCore(client)

    async def fake_connection_loop() -> None:
        # What _session does once connected, with the fake in place of aiomqtt's client.
        client._mqtt = core  # type: ignore[assignment]
        client.protocol_version = "3.1.1"
        client.connected.set()
        await client._greet()
        await asyncio.Event().wait()

    client._connection_loop = fake_connection_loop  # type: ignore[method-assign]
    return client, core


def test_constructor_validates_device_id_and_protocol() -> None:
    with pytest.raises(ValueError, match="invalid device id"):
        DeviceClient("dev/1", "h", 1, "ca", "c", "k")
    with pytest.raises(ValueError, match="protocol"):
        make_client(protocol="4")


@pytest.mark.asyncio
async def test_connect_says_hello_then_pulls_and_runs_tasks(wired: tuple[DeviceClient, FakeCore]) -> None:
    client, core = wired
    core.tasks.append(make_task("echo", {"a": 1}))

    @client.task_handler("echo")
    async def echo(context: TaskContext) -> dict[str, Any]:
        return context.params

    async with client:
        await until(lambda: client.stats.tasks_done == 1 and core.methods()[-1] == "tasks/next")
        assert client.ready.is_set()
        assert client.device is not None
        assert client.device.online
        assert core.methods()[:2] == ["hello", "tasks/next"]
        assert core.requests[2][1] == {"status": "succeeded", "result": {"a": 1}, "error": None, "next": True}

        # A notice wakes the pull; an unknown method is rejected.
        task = make_task("dance", {})
        core.tasks.append(task)
        core.deliver("notify", orjson.dumps({"event": "task_queued", "task_id": task["id"]}))
        await until(lambda: client.stats.tasks_rejected == 1)


@pytest.mark.asyncio
async def test_canceled_notice_cancels_the_running_handler(wired: tuple[DeviceClient, FakeCore]) -> None:
    client, core = wired
    task = make_task("slow", {})
    core.tasks.append(task)

    @client.task_handler("slow")
    async def slow(context: TaskContext) -> None:
        await asyncio.sleep(60)

    async with client:
        await until(lambda: client.running_task is not None)
        core.tasks.clear()
        core.deliver("notify", orjson.dumps({"event": "task_canceled", "task_id": task["id"]}))
        await until(lambda: client.stats.tasks_canceled == 1)
        assert not any(method.endswith("/result") for method in core.methods())


@pytest.mark.asyncio
async def test_desired_config_is_applied_and_reported_once(wired: tuple[DeviceClient, FakeCore]) -> None:
    client, core = wired
    async with client:
        await until(client.ready.is_set)
        for _ in range(2):  # a retained config comes again on every reconnect
            core.deliver("config", orjson.dumps({"interval": 5}))
        await until(lambda: ("state", {"reported": {"interval": 5}}) in core.requests)
        await asyncio.sleep(0.01)
        assert core.methods().count("state") == 1
        assert client.current_config == {"interval": 5}


@pytest.mark.asyncio
async def test_on_config_decides_what_is_reported() -> None:
    applied: list[dict[str, Any]] = []

    async def on_config(desired: dict[str, Any]) -> dict[str, Any]:
        applied.append(desired)
        return {**desired, "clamped": True}

    client = make_client(on_config=on_config)
    client._desired = {"interval": 1}
    core = FakeCore(client)
    client._mqtt = core  # type: ignore[assignment]
    client.connected.set()
    await client._apply_config({"interval": 1})
    assert applied == [{"interval": 1}]
    assert core.requests == [("state", {"reported": {"interval": 1, "clamped": True}})]


@pytest.mark.asyncio
async def test_malformed_messages_are_counted_and_ignored(wired: tuple[DeviceClient, FakeCore]) -> None:
    client, core = wired
    async with client:
        await until(client.ready.is_set)
        core.deliver("notify", b"not json")
        core.deliver("notify", b'{"event": "reboot_now", "task_id": "x"}')
        core.deliver("config", b"[1, 2]")
        core.deliver("rpc", b'{"result": 1}')
        await until(lambda: client.stats.malformed_messages == 4)
        # Still alive: an explicit call goes through.
        assert await client.call("state", {"reported": {}}) == {}


@pytest.mark.asyncio
async def test_run_keeps_retrying_without_a_broker_and_stops_promptly() -> None:
    client = make_client(reconnect_min=0.01, reconnect_max=0.02)
    runner = asyncio.create_task(client.run())
    await until(lambda: client.stats.connect_failures >= 3)
    async with asyncio.timeout(5):
        await client.stop()
        await runner
    assert not client.connected.is_set()


@pytest.mark.asyncio
async def test_leaving_the_block_at_once_stops_the_client() -> None:
    client = make_client()
    async with asyncio.timeout(5):
        async with client:
            pass
    async with asyncio.timeout(5):
        async with client:  # and it can run again
            await until(lambda: client.stats.connect_failures >= 1)
    assert client._main is None


@pytest.mark.asyncio
async def test_cancel_until_done_outlasts_a_swallowed_cancellation() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            swallowed += 1  # what a racing asyncio.wait_for on 3.11 can do
        await asyncio.sleep(60)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await _cancel_until_done({task})
    assert swallowed == 1
    assert task.cancelled()
