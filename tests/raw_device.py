"""A bare MQTT device for tests: publishes any bytes on its up-topics and collects what comes down.

No SDK logic (no retries, no task worker): the tests decide every message, including broken ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import orjson

from swarm_device import protocol
from tests.conftest import DeviceCredentials


class RawDevice:
    def __init__(self, client: aiomqtt.Client, device_id: str) -> None:
        self.client = client
        self.device_id = device_id
        # Replies by request id, so that concurrent calls never take each other's.
        self.replies: defaultdict[str | None, asyncio.Queue[dict[str, Any]]] = defaultdict(asyncio.Queue)
        self.notices: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        reply_topic = protocol.reply_topic(self.device_id)
        async for message in self.client.messages:
            body = orjson.loads(message.payload) if isinstance(message.payload, bytes) else None
            if message.topic.value == reply_topic:
                await self.replies[body.get("id")].put(body)
            else:
                await self.notices.put(body)

    async def send(self, method: str, payload: bytes) -> None:
        """Publish raw bytes to `dev/{id}/up/rpc/{method}` (QoS 1)."""
        await self.client.publish(protocol.request_topic(self.device_id, method), payload, qos=1)

    async def reply_to(self, request_id: str | None, within_s: float = 10.0) -> dict[str, Any]:
        """The next reply with this id."""
        async with asyncio.timeout(within_s):
            return await self.replies[request_id].get()

    async def call(self, method: str, params: dict[str, Any] | None = None, within_s: float = 10.0) -> dict[str, Any]:
        """Send a well-formed request and return the whole reply (`result` or `error`)."""
        request_id = uuid.uuid4().hex
        await self.send(method, orjson.dumps({"id": request_id, "params": params or {}}))
        return await self.reply_to(request_id, within_s)

    async def result(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """`call`, asserting the reply is a result."""
        reply = await self.call(method, params)
        assert "result" in reply, reply
        return reply["result"]

    async def next_notice(self, within_s: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(within_s):
            return await self.notices.get()


@contextlib.asynccontextmanager
async def raw_device(host: str, port: int, creds: DeviceCredentials) -> AsyncIterator[RawDevice]:
    tls = ssl.create_default_context(cafile=str(creds.ca_file))
    tls.load_cert_chain(creds.cert_file, creds.key_file)
    client = aiomqtt.Client(
        host,
        port,
        identifier=creds.device_id,
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=True,
        tls_context=tls,
        timeout=10,
    )
    async with client:
        topics = [protocol.notify_topic(creds.device_id), protocol.reply_topic(creds.device_id)]
        await client.subscribe([(topic, 1) for topic in topics])
        device = RawDevice(client, creds.device_id)
        try:
            yield device
        finally:
            device._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await device._reader
