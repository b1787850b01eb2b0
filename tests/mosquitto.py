"""Drive the stock mosquitto clients as an external device (the tests' independent MQTT peer)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    ca_file: Path


def tls_args(endpoint: Endpoint, cert: Path | None, key: Path | None, version: str = "mqttv311") -> list[str]:
    args = ["-h", endpoint.host, "-p", str(endpoint.port), "--cafile", str(endpoint.ca_file), "-V", version]
    if cert is not None and key is not None:
        args += ["--cert", str(cert), "--key", str(key)]
    return args


class Subscriber:
    """A running `mosquitto_sub -v -d`: yields (topic, payload) and knows when it is subscribed."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.subscribed = asyncio.Event()
        self.messages: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.debug: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            # With -v a message is "<topic> <payload>"; our topics all start with dev/.
            if line.startswith("dev/") and " " in line:
                topic, _, payload = line.partition(" ")
                await self.messages.put((topic, payload.encode()))
            else:
                self.debug.append(line)
                if "received SUBACK" in line:
                    self.subscribed.set()

    async def next_json(self, topic: str, within_s: float = 10.0) -> dict[str, Any]:
        """The next message on `topic` (others are skipped), decoded."""
        async with asyncio.timeout(within_s):
            while True:
                got_topic, payload = await self.messages.get()
                if got_topic == topic:
                    decoded = orjson.loads(payload)
                    assert isinstance(decoded, dict)
                    return decoded

    async def wait_subscribed(self, within_s: float = 15.0) -> None:
        async with asyncio.timeout(within_s):
            await self.subscribed.wait()

    async def exit_code(self, within_s: float = 10.0) -> int:
        async with asyncio.timeout(within_s):
            return await self.process.wait()


@contextlib.asynccontextmanager
async def subscriber(
    endpoint: Endpoint,
    cert: Path | None,
    key: Path | None,
    client_id: str,
    topics: list[str],
    *,
    clean_session: bool = False,
) -> AsyncIterator[Subscriber]:
    # stdbuf: mosquitto_sub block-buffers a pipe, and we read it line by line as it happens.
    args = ["stdbuf", "-oL", "mosquitto_sub", *tls_args(endpoint, cert, key), "-i", client_id, "-q", "1", "-v", "-d"]
    if not clean_session:
        args.append("-c")
    for topic in topics:
        args += ["-t", topic]
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    sub = Subscriber(process)
    try:
        yield sub
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()
        sub._reader.cancel()


async def _run(program: str, args: list[str], payload: bytes | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        program,
        *args,
        stdin=asyncio.subprocess.PIPE if payload is not None else None,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(payload), 30)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def publish(
    endpoint: Endpoint, cert: Path | None, key: Path | None, client_id: str, topic: str, payload: bytes
) -> tuple[int, str]:
    """Publish one QoS 1 message; returns mosquitto_pub's exit code and output."""
    args = [*tls_args(endpoint, cert, key), "-i", client_id, "-q", "1", "-t", topic, "-s"]
    return await _run("mosquitto_pub", args, payload)


async def request(
    endpoint: Endpoint, cert: Path, key: Path, client_id: str, topic: str, response_topic: str, payload: bytes
) -> tuple[int, str]:
    """One MQTT 5 request with `mosquitto_rr` (Response Topic, Correlation Data) on one connection;
    returns its exit code and what it printed (the response's payload)."""
    args = [*tls_args(endpoint, cert, key, "mqttv5"), "-i", client_id, "-q", "1", "-t", topic, "-e", response_topic]
    return await _run("mosquitto_rr", [*args, "-W", "20", "-m", payload.decode()])
