"""Wake long-polling requests when their task becomes final, in whichever app process that happens.

While anything is watched, the change feed (app/events/feed.py) wakes this on every commit it
sees; one query then finds which watched tasks are final, and their waiters are woken. A final
task never changes again, so a wake-up stays true. A waiter re-reads its task now and then
anyway: a wake-up is a hint, the database is the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence

from sqlalchemy import ARRAY, Uuid, any_, bindparam, select

from app.db import Sessions
from app.events.feed import ChangeFeed
from app.tasks.models import Task
from swarm_device.protocol import FINAL_STATUSES

log = logging.getLogger(__name__)

_FINAL = sorted(s.value for s in FINAL_STATUSES)


# For code that speaks asyncpg directly (bench, tests); its home would be app/db.py.
class TaskWaiters:
    def __init__(self, sessions: Sessions, feed: ChangeFeed) -> None:
        self._sessions = sessions
        self._feed = feed
        self._events: defaultdict[uuid.UUID, set[asyncio.Event]] = defaultdict(set)
        self._checker: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def watch(self, task_id: uuid.UUID) -> Iterator[asyncio.Event]:
        """An event that is set once the task is final (it never needs clearing)."""
        event = asyncio.Event()
        with self._feed.subscribed():
            self._events[task_id].add(event)
            if self._checker is None:
                self._checker = asyncio.create_task(self._check_on_changes(), name="task-waiters")
            try:
                yield event
            finally:
                self._events[task_id].discard(event)
                if not self._events[task_id]:
                    del self._events[task_id]

    async def stop(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker

    async def _check_on_changes(self) -> None:
        # Left waiting when the last watch ends: the feed stops polling then, so this costs
        # nothing, and the next watch's first wake-up finds it.
        changed = self._feed.next_change()
        try:
            while self._events:
                await changed.wait()
                # Taken before the query: a commit during it wakes the next round.
                changed = self._feed.next_change()
                if not self._events:
                    break
                try:
                    final = await self._final_among(list(self._events))
                except Exception:
                    log.exception("checking watched tasks failed; their waiters re-read them later")
                    continue
                for task_id in final:
                    for event in self._events.get(task_id, ()):
                        event.set()
        finally:
            self._checker = None

    async def _final_among(self, task_ids: list[uuid.UUID]) -> Sequence[uuid.UUID]:
        # One statement text whatever the number of ids (asyncpg caches prepared statements).
        ids = bindparam("task_ids", task_ids, type_=ARRAY(Uuid()))
        query = select(Task.id).where(Task.id == any_(ids), Task.status.in_(_FINAL))
        async with self._sessions() as session:
            return (await session.scalars(query)).all()
