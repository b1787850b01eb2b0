"""Wake-ups for what waits on the database in this process: SSE streams and long-polls.

One poller per process, running only while somebody is subscribed, reads PostgreSQL's snapshot
every `interval_s` and wakes the subscribers when it changed: some transaction that wrote
something ended since the last look, in whichever process. A wake-up carries nothing: the
subscribers read the database itself. Polling, not LISTEN/NOTIFY: NOTIFY serialises every commit
that sends one (docs/decisions.md), while this costs one read per interval and only while
somebody waits; a wake-up lags its commit by at most the interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from app.db import Sessions
from app.events import repository as repo

log = logging.getLogger(__name__)


class ChangeFeed:
    def __init__(self, sessions: Sessions, interval_s: float) -> None:
        self._sessions = sessions
        self._interval_s = interval_s
        self._changed = asyncio.Event()
        self._subscribers = 0
        self._poller: asyncio.Task[None] | None = None

    @property
    def polling(self) -> bool:
        return self._poller is not None

    @contextlib.contextmanager
    def subscribed(self) -> Iterator[None]:
        """Keep the poller running while inside; it stops once the last subscriber has left."""
        self._subscribers += 1
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll(), name="change-feed")
        try:
            yield
        finally:
            self._subscribers -= 1

    def next_change(self) -> asyncio.Event:
        """The event that is set on the next wake-up; take it before reading the database."""
        return self._changed

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    async def _poll(self) -> None:
        # None: the first look (and the first after a failure) always wakes, since a commit may
        # have come between a subscriber's own read and that look.
        seen: str | None = None
        failing = False
        try:
            while self._subscribers:
                try:
                    marker = await self._read_marker()
                except Exception:
                    if not failing:
                        log.exception("polling for commits failed; retrying every %.2fs", self._interval_s)
                    failing, seen = True, None
                else:
                    failing = False
                    if marker != seen:
                        seen = marker
                        self._wake()
                await asyncio.sleep(self._interval_s)
        finally:
            self._poller = None

    async def _read_marker(self) -> str:
        async with self._sessions() as session:
            # One statement, no BEGIN/ROLLBACK round trips around it.
            await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
            return await repo.commits_marker(session)

    def _wake(self) -> None:
        # Wake every waiting subscriber, then start a new generation for the next wake-up.
        self._changed.set()
        self._changed = asyncio.Event()
