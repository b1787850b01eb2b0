"""A minimal HTTP/1.1 keep-alive client for load: it must cost far less CPU than the server it loads.

httpx spends more CPU per request than the app does to answer it on this 2-core box, so the load
would measure the client. This sends pre-built requests on raw asyncio streams and reads replies
by Content-Length, which is all the app's JSON answers need.
"""

from __future__ import annotations

import asyncio
import contextlib

import orjson

_HEADER_END = b"\r\n\r\n"


class HttpConnection:
    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None) -> None:
        self._host = host
        self._port = port
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self._fixed_headers = f"Host: {host}\r\n{extra}".encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self._writer is not None:
            writer, self._writer, self._reader = self._writer, None, None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def post_json(self, path: str, payload: object) -> tuple[int, bytes]:
        """POST a JSON body; returns the status and the raw answer body."""
        body = orjson.dumps(payload)
        head = (
            f"POST {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
            + self._fixed_headers
            + b"\r\n"
        )
        return await self._exchange(head + body)

    async def get(self, path: str) -> tuple[int, bytes]:
        return await self._exchange(f"GET {path} HTTP/1.1\r\n".encode() + self._fixed_headers + b"\r\n")

    async def _exchange(self, request: bytes) -> tuple[int, bytes]:
        if self._writer is None or self._reader is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        self._writer.write(request)
        head = await self._reader.readuntil(_HEADER_END)
        status = int(head[9:12])
        length = _content_length(head)
        body = await self._reader.readexactly(length) if length else b""
        return status, body


def _content_length(head: bytes) -> int:
    start = head.lower().find(b"\r\ncontent-length:")
    if start < 0:
        raise ValueError("the answer has no Content-Length (chunked answers are not supported here)")
    end = head.find(b"\r\n", start + 2)
    return int(head[start + 17 : end])
