"""Task notices to devices, sent after the commit and off the request path.

A request commits its task and returns; the notifier publishes the `task_queued` notices in
batches with broker confirms in flight, then marks the confirmed ones SENT in one UPDATE. The
database stays the truth: a notice that is never confirmed (broker down, process killed) keeps
its `notice_due_at`, and the periodic job hands it back here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from typing import Literal

import orjson
from faststream.rabbit import RabbitBroker
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.broker import publish_to_device
from app.tasks import repository as repo
from swarm_device.protocol import notify_topic

log = logging.getLogger(__name__)

NoticeEvent = Literal["task_queued", "task_canceled"]


@dataclass(frozen=True, slots=True)
class PendingNotice:
    task_id: uuid.UUID
    device_id: str
    event: NoticeEvent


class Notifier:
    def __init__(
        self,
        broker: RabbitBroker,
        sessions: async_sessionmaker[AsyncSession],
        *,
        batch_size: int = 500,
        max_pending: int = 100_000,
    ) -> None:
        self._broker = broker
        self._sessions = sessions
        self._batch_size = batch_size
        self._queue: asyncio.Queue[PendingNotice] = asyncio.Queue(max_pending)
        self._worker: asyncio.Task[None] | None = None

    def task_queued(self, task_id: uuid.UUID, device_id: str) -> None:
        self._submit(PendingNotice(task_id, device_id, "task_queued"))

    def task_canceled(self, task_id: uuid.UUID, device_id: str) -> None:
        self._submit(PendingNotice(task_id, device_id, "task_canceled"))

    def _submit(self, notice: PendingNotice) -> None:
        try:
            self._queue.put_nowait(notice)
        except asyncio.QueueFull:
            # Not lost: the task keeps notice_due_at and the periodic job re-sends it.
            log.warning("notice backlog full; task %s waits for the re-send job", notice.task_id)

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="notifier")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (bounded by timeout_s), then stop."""
        if self._worker is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._worker = None

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._send(batch)
            except Exception:
                log.exception("sending %d notices failed; the re-send job will retry", len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _send(self, batch: list[PendingNotice]) -> None:
        outcomes = await asyncio.gather(*(self._publish(n) for n in batch), return_exceptions=True)
        routed: list[uuid.UUID] = []
        unrouted: list[uuid.UUID] = []
        for notice, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.warning("notice for task %s not confirmed: %r", notice.task_id, outcome)
            elif notice.event == "task_queued":
                (routed if outcome else unrouted).append(notice.task_id)
        if routed or unrouted:
            async with self._sessions() as session:
                await repo.mark_noticed(session, routed, unrouted)
                await session.commit()

    async def _publish(self, notice: PendingNotice) -> bool:
        body = orjson.dumps({"event": notice.event, "task_id": str(notice.task_id)})
        return await publish_to_device(
            self._broker, notify_topic(notice.device_id), body, message_id=f"{notice.event}:{notice.task_id}"
        )
