"""Wake long-polling requests when a task becomes final, in whichever app process that happens.

A trigger on `tasks` calls pg_notify('swarm_task_final', id) when a task reaches a final state;
PostgreSQL delivers it after the commit to every listening process. A lost notification (the
listener reconnecting) only delays a waiter until its next re-check of the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterator

import asyncpg
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

CHANNEL = "swarm_task_final"


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)


class TaskWaiters:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._events: defaultdict[uuid.UUID, set[asyncio.Event]] = defaultdict(set)
        self._listener: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._listener = asyncio.create_task(self._listen_forever(), name="task-waiters")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    @contextlib.contextmanager
    def watch(self, task_id: uuid.UUID) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._events[task_id].add(event)
        try:
            yield event
        finally:
            self._events[task_id].discard(event)
            if not self._events[task_id]:
                del self._events[task_id]

    def _wake(self, task_id: uuid.UUID) -> None:
        for event in self._events.get(task_id, ()):
            event.set()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self._wake(uuid.UUID(payload))

    async def _listen_forever(self) -> None:
        backoff = 0.5
        while True:
            try:
                conn = await asyncpg.connect(self._dsn, timeout=5)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                log.warning("long-poll listener cannot connect (%r); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            closed = asyncio.Event()
            try:
                conn.add_termination_listener(lambda _c, closed=closed: closed.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                # Wake everyone once: anything that finished while we were not listening is re-read.
                for task_id in list(self._events):
                    self._wake(task_id)
                await closed.wait()
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2)
