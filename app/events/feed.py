"""Wake-ups for the event streams of this process, from PostgreSQL notifications.

Triggers on `task_events` and `device_events` call pg_notify('swarm_events') once per statement;
PostgreSQL delivers it after the commit to every listening app process, whichever one wrote the
events. A wake-up carries nothing: the streams read the event log itself.
"""

from __future__ import annotations

import asyncio
import contextlib

from app.pg_notify import listen_forever

CHANNEL = "swarm_events"


class EventFeed:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._changed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._listener = asyncio.create_task(
            listen_forever(self._dsn, CHANNEL, lambda _payload: self._wake(), self._wake), name="event-feed"
        )

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    def _wake(self) -> None:
        # Wake every waiting stream, then start a new generation for the next wake-up.
        self._changed.set()
        self._changed = asyncio.Event()

    def next_change(self) -> asyncio.Event:
        """The event that is set on the next wake-up; take it before reading the log."""
        return self._changed
