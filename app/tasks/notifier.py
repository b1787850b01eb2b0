"""Task notices to devices, sent after the commit and off the request path.

A request commits its task and returns; the notifier publishes the notices in windows with
broker confirms in flight, then marks the confirmed ones in one UPDATE while the next window is
published. The database stays the truth: a notice that is never confirmed (broker down, process
killed) keeps its `notice_due_at`, and the periodic job hands it back here.

Two lanes: notices of single tasks, retries and cancels go before bulk notices (batches, and
notices the re-send job hands back), so a batch of 100,000 delays a later single task's notice by
one window at most, not by its backlog, even once it overflowed into the re-send path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import orjson

from app.broker import ConfirmedPublisher, Outgoing
from app.db import Sessions
from app.tasks import repository as repo
from swarm_device.protocol import notify_topic

log = logging.getLogger(__name__)

NoticeEvent = Literal["task_queued", "task_canceled"]

# What one process publishes at the least (the bench box drains ~1,400 notices/s a process). Bulk
# notices are due for a re-send only once the lane ahead of them should have drained at this pace:
# the re-send job of another process must not take notices that are only waiting in this one's.
BULK_NOTICES_FLOOR_PER_S = 500.0


@dataclass(frozen=True, slots=True)
class PendingNotice:
    task_id: uuid.UUID
    device_id: str
    event: NoticeEvent

    def message(self, expiry_s: int) -> Outgoing:
        body = orjson.dumps({"event": self.event, "task_id": str(self.task_id)})
        return Outgoing(
            notify_topic(self.device_id), body, message_id=f"{self.event}:{self.task_id}", expiry_s=expiry_s
        )


class Lanes:
    """Notices waiting to be sent: the urgent lane first, then bulk; each notice once, and at
    most `max_pending` in each lane.

    A notice stays known (`pending`) until `done`, so that the re-send job handing back a notice
    that is still waiting or in flight does not send it twice.
    """

    def __init__(self, max_pending: int) -> None:
        self._urgent: deque[PendingNotice] = deque()
        self._bulk: deque[PendingNotice] = deque()
        self._pending: set[PendingNotice] = set()
        self._max_pending = max_pending
        self.ready = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()

    def put(self, notices: Iterable[PendingNotice], *, bulk: bool, leased: bool = False) -> int:
        """Queue the notices not known yet; returns how many did not fit (the re-send job sends those).

        Leased notices are taken beyond `max_pending`: no re-send job would send them before their
        lease runs out. They fitted when leased; other batches may have filled the lane since (by
        at most the batches in flight).
        """
        lane = self._bulk if bulk else self._urgent
        refused = 0
        for notice in notices:
            if notice in self._pending:
                continue
            # Per lane: a full bulk lane never refuses a single task's notice.
            if len(lane) >= self._max_pending and not leased:
                refused += 1
                continue
            self._pending.add(notice)
            lane.append(notice)
        if lane:
            self.ready.set()
            self.idle.clear()
        return refused

    def waiting(self) -> int:
        return len(self._urgent) + len(self._bulk)

    def bulk_waiting(self) -> int:
        return len(self._bulk)

    def bulk_room(self) -> int:
        return self._max_pending - len(self._bulk)

    def take(self, limit: int) -> list[PendingNotice]:
        taken: list[PendingNotice] = []
        for lane in (self._urgent, self._bulk):
            while lane and len(taken) < limit:
                taken.append(lane.popleft())
        if not (self._urgent or self._bulk):
            self.ready.clear()
        return taken

    def done(self, notices: Iterable[PendingNotice]) -> None:
        self._pending.difference_update(notices)
        if not self._pending:
            self.idle.set()


class Notifier:
    def __init__(
        self,
        publisher: ConfirmedPublisher,
        sessions: Sessions,
        *,
        window: int = 500,
        max_pending: int = 100_000,
        expiry_s: int = 3600,
    ) -> None:
        self._publisher = publisher
        self._expiry_s = expiry_s
        self._sessions = sessions
        self._window = window
        self._lanes = Lanes(max_pending)
        self._worker: asyncio.Task[None] | None = None

    def task_queued(self, task_id: uuid.UUID, device_id: str) -> None:
        self._submit([PendingNotice(task_id, device_id, "task_queued")], bulk=False)

    def task_canceled(self, task_id: uuid.UUID, device_id: str) -> None:
        self._submit([PendingNotice(task_id, device_id, "task_canceled")], bulk=False)

    def tasks_queued_in_bulk(self, tasks: Iterable[tuple[uuid.UUID, str]], *, leased: bool = False) -> None:
        """Notices of a batch, and those the re-send job hands back: sent after every single
        task's, retry's and cancel's notice. `leased`: their tasks' notice_due_at was set by
        `bulk_lease_s`."""
        notices = (PendingNotice(task_id, device_id, "task_queued") for task_id, device_id in tasks)
        self._submit(notices, bulk=True, leased=leased)

    def _submit(self, notices: Iterable[PendingNotice], *, bulk: bool, leased: bool = False) -> None:
        if refused := self._lanes.put(notices, bulk=bulk, leased=leased):
            # Not lost: the tasks keep notice_due_at and the periodic job re-sends them.
            log.warning("notice backlog full; %d notices wait for the re-send job", refused)

    def bulk_room(self) -> int:
        """How many more bulk notices this process takes now."""
        return self._lanes.bulk_room()

    def bulk_lease_s(self, more: int) -> float:
        """How long `more` bulk notices queued now may take to go out at the floor pace; their
        tasks' `notice_due_at` is set that far ahead, so no re-send job takes them meanwhile.
        0 if they do not all fit in the lane: the overflow is for any process's re-send job now."""
        if more > self._lanes.bulk_room():
            return 0.0
        return (self._lanes.bulk_waiting() + more) / BULK_NOTICES_FLOOR_PER_S

    @property
    def busy(self) -> bool:
        """Notices wait here to be sent (those in flight are not counted)."""
        return self._lanes.waiting() > 0

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="notifier")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (bounded by timeout_s), then stop."""
        if self._worker is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._lanes.idle.wait(), timeout_s)
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._worker = None

    async def _run(self) -> None:
        # The UPDATE of one window runs while the next window is published.
        recording: asyncio.Task[None] | None = None
        try:
            while True:
                await self._lanes.ready.wait()
                window = self._lanes.take(self._window)
                outcomes = await self._publish(window)
                if recording is not None:
                    await recording
                recording = asyncio.create_task(self._record(window, outcomes))
        finally:
            if recording is not None:
                recording.cancel()

    async def _publish(self, window: list[PendingNotice]) -> list[bool | BaseException]:
        try:
            return await self._publisher.publish_many([notice.message(self._expiry_s) for notice in window])
        except Exception as exc:  # no connection: nothing was sent
            return [exc] * len(window)

    async def _record(self, window: list[PendingNotice], outcomes: list[bool | BaseException]) -> None:
        routed: list[uuid.UUID] = []
        unrouted: list[uuid.UUID] = []
        failed: list[BaseException] = []
        for notice, outcome in zip(window, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failed.append(outcome)
            elif notice.event == "task_queued":
                (routed if outcome else unrouted).append(notice.task_id)
        if failed:
            log.warning("%d notices not confirmed (%r); the re-send job will retry", len(failed), failed[0])
        try:
            if routed or unrouted:
                async with self._sessions() as session:
                    await repo.mark_noticed(session, routed, unrouted)
                    await session.commit()
        except Exception:
            log.exception("recording %d confirmed notices failed; the re-send job will retry", len(window))
        finally:
            self._lanes.done(window)
