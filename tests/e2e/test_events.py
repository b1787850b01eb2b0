"""The SSE event stream, served by a second app instance (uvicorn, real HTTP): events written by
one instance reach the streams of another, in order, and a reconnecting client resumes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import orjson
import pytest
import uvicorn

from app.main import create_app
from app.settings import Settings
from swarm_device.protocol import METHOD_TASKS_NEXT
from tests.conftest import DeviceCredentials, EnrolDevice
from tests.e2e.test_sdk_device import make_device, running, wait_final

Event = tuple[int, str, dict[str, object]]


async def subscribe_once(settings: Settings, creds: DeviceCredentials) -> None:
    """Connect the device once and leave: its session queue stays, so the next notice is routed
    (the task becomes SENT) while the device is offline, and events come in a fixed order."""
    async with running(make_device(settings, creds)) as device:
        # Requests of one method are answered in order: once this one is, the device's own
        # pull on connect was answered too and cannot claim a task created later.
        assert await device.call(METHOD_TASKS_NEXT) is None


@pytest.fixture
async def second_app(settings: Settings, app_client: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        assert not serving.done(), "the second app did not start"
        await asyncio.sleep(0.05)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}/api/v1", headers=app_client.headers, timeout=30
        ) as client:
            yield client
    finally:
        server.should_exit = True
        await serving


@asynccontextmanager
async def sse(
    client: httpx.AsyncClient, params: dict[str, str], last_id: int | None = None
) -> AsyncIterator[AsyncIterator[Event]]:
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    async with client.stream("GET", "/events", params=params, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")

        async def frames() -> AsyncIterator[Event]:
            fields: dict[str, str] = {}
            async for line in response.aiter_lines():
                if line == "":
                    if "data" in fields:
                        yield int(fields["id"]), fields["event"], orjson.loads(fields["data"])
                    fields = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(": ")
                    fields[name] = value

        yield frames()


async def collect(frames: AsyncIterator[Event], until: str, seconds: float = 20) -> list[Event]:
    events: list[Event] = []

    async def read() -> None:
        async for event in frames:
            events.append(event)
            if event[1] == until:
                return

    await asyncio.wait_for(read(), seconds)
    return events


async def test_stream_shows_every_event_in_order_and_resumes(
    app_client: httpx.AsyncClient, second_app: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds = await enrol_device("sse")
    await subscribe_once(settings, creds)
    params = {"device_id": creds.device_id, "type": "task", "heartbeat": "1"}
    async with sse(second_app, params) as frames:
        created = await app_client.post(f"/devices/{creds.device_id}/tasks", json={"method": "echo"})
        task_id = created.json()["id"]
        first = await collect(frames, until="task.sent")
    assert [kind for _, kind, _ in first] == ["task.created", "task.sent"]
    assert all(data["task_id"] == task_id for _, _, data in first)

    # Disconnected; the task runs meanwhile.
    async with running(make_device(settings, creds)):
        assert (await wait_final(app_client, task_id))["status"] == "succeeded"

    async with sse(second_app, params, last_id=first[-1][0]) as frames:
        rest = await collect(frames, until="task.succeeded")
    assert [kind for _, kind, _ in rest] == ["task.in_progress", "task.progress", "task.succeeded"]
    assert [data["version"] for _, _, data in first + rest] == [1, 2, 3, 4, 5]
    ids = [event_id for event_id, _, _ in first + rest]
    assert ids == sorted(ids)


async def test_stream_shows_presence_and_keeps_alive(
    app_client: httpx.AsyncClient, second_app: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds = await enrol_device("sse")
    params = {"device_id": creds.device_id, "type": "device", "heartbeat": "1"}
    async with second_app.stream("GET", "/events", params=params) as response:
        lines = response.aiter_lines()
        # Nothing happens to this device: a keep-alive comment arrives anyway.
        assert await asyncio.wait_for(_next_comment(lines), 5) == ": keep-alive"
    async with sse(second_app, params) as frames:
        async with running(make_device(settings, creds)):
            online = await collect(frames, until="device.online")
        offline = await collect(frames, until="device.offline")
    assert [kind for _, kind, _ in online + offline] == ["device.online", "device.offline"]


async def _next_comment(lines: AsyncIterator[str]) -> str:
    async for line in lines:
        if line.startswith(":"):
            return line
    raise AssertionError("stream ended")
