"""PostgreSQL LISTEN: one connection per channel and process, kept open until cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

log = logging.getLogger(__name__)


async def listen_forever(
    dsn: str, channel: str, on_notify: Callable[[str], None], on_connected: Callable[[], None]
) -> None:
    """LISTEN on `channel` until cancelled, reconnecting with backoff; `on_notify(payload)` per
    notification, `on_connected()` after every (re)connect, since notifications sent while no
    connection listened are lost (listeners re-read the database then)."""
    backoff = 0.5
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            log.warning("listener on %s cannot connect (%r); retrying in %.1fs", channel, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            continue
        backoff = 0.5
        closed = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _c, closed=closed: closed.set())
            await conn.add_listener(channel, lambda _c, _pid, _channel, payload: on_notify(payload))
            on_connected()
            await closed.wait()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)
