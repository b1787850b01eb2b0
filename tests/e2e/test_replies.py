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
from tests.polling import eventually
from tests.raw_device import raw_device

HELLO = {"firmware": "1.0", "model": "m", "capabilities": []}


async def close_reply_connections(settings: Settings) -> bool:
    """Have the broker close the app's reply connection; False if it lists none yet."""
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
    assert len(names) <= 1, names
    return len(names) == 1


async def test_a_request_is_answered_after_the_reply_connection_was_lost(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds = await enrol_device("replies")
    async with raw_device(settings.broker.mqtt_host, settings.broker.mqtt_port, creds) as dev:
        assert (await dev.result("hello", HELLO))["id"] == creds.device_id
        # The management API lists a new connection once its statistics collector has run.
        await eventually(lambda: close_reply_connections(settings), within_s=20, every_s=0.5)
        # The next reply opens the connection again (the request is held meanwhile).
        assert await dev.result("tasks/next") is None
        assert (await dev.result("hello", HELLO))["id"] == creds.device_id


async def test_copies_of_an_answered_request_are_each_answered(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    # Two copies of an answered request arriving together: both are answered with the kept reply
    # (decision 22), published at once; the replies' message ids are the core's own, so the two
    # publishes in flight never get mixed up.
    creds = await enrol_device("replies")
    async with raw_device(settings.broker.mqtt_host, settings.broker.mqtt_port, creds) as dev:
        request = orjson.dumps({"id": "again", "params": HELLO})
        await dev.send("hello", request)
        first = await dev.reply_to("again")
        assert first["result"]["id"] == creds.device_id
        await asyncio.gather(dev.send("hello", request), dev.send("hello", request))
        assert [await dev.reply_to("again"), await dev.reply_to("again")] == [first, first]
