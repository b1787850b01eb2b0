"""Wake long-polling requests when a task becomes final, in whichever app process that happens.

A trigger on `tasks` calls pg_notify('swarm_task_final', id) when a task reaches a final state;
PostgreSQL delivers it after the commit to every listening process. A lost notification (the
listener reconnecting) only delays a waiter until its next re-check of the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from collections.abc import Iterator

from sqlalchemy.engine import make_url

from app.pg_notify import listen_forever

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

    def _on_notify(self, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self._wake(uuid.UUID(payload))

    def _wake_all(self) -> None:
        # Anything that finished while nobody listened is re-read by its waiter.
        for task_id in list(self._events):
            self._wake(task_id)

    async def _listen_forever(self) -> None:
        await listen_forever(self._dsn, CHANNEL, self._on_notify, self._wake_all)
