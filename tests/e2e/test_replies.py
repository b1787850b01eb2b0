"""Replies to device requests go out on the core's own reply connection (a `ConfirmedPublisher`),
not on the connection that consumes the requests: losing it must not leave a request unanswered."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import httpx
import orjson

from app.settings import Settings
from tests.conftest import EnrolDevice
from tests.management import management_client
from tests.raw_device import raw_device

HELLO = {"firmware": "1.0", "model": "m", "capabilities": []}


async def close_reply_connections(settings: Settings) -> int:
    """Have the broker close the app's reply connection(s); returns how many it closed."""
    async with management_client(settings.broker) as client:
        response = await client.get("/api/connections", params={"columns": "name,client_properties"})
        response.raise_for_status()
        names = [
            c["name"]
            for c in response.json()
            if c.get("client_properties", {}).get("connection_name") == "swarm-core replies"
        ]
        for name in names:
            (await client.delete(f"/api/connections/{quote(name, safe='')}")).raise_for_status()
    return len(names)


async def test_a_request_is_answered_after_the_reply_connection_was_lost(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds = await enrol_device("replies")
    async with raw_device(settings.broker.mqtt_host, settings.broker.mqtt_port, creds) as dev:
        assert (await dev.result("hello", HELLO))["id"] == creds.device_id
        assert await close_reply_connections(settings) == 1
        # The next reply opens the connection again (the request is held meanwhile).
        assert await dev.result("tasks/next") is None
        assert (await dev.result("hello", HELLO))["id"] == creds.device_id


async def test_the_same_request_id_twice_in_flight_is_answered_twice(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    # A device that retries a request before its first reply came: both copies are answered
    # (the replies' message ids are the core's own, so the two publishes never get mixed up).
    creds = await enrol_device("replies")
    async with raw_device(settings.broker.mqtt_host, settings.broker.mqtt_port, creds) as dev:
        request = orjson.dumps({"id": "again", "params": HELLO})
        await asyncio.gather(dev.send("hello", request), dev.send("hello", request))
        first, second = await dev.reply_to("again"), await dev.reply_to("again")
        assert first["result"]["id"] == second["result"]["id"] == creds.device_id
