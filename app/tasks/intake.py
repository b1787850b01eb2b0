"""Intake batching: task creations that wait at the same moment in one process share one INSERT
and one commit.

A request hands its row over and awaits its own outcome; it is answered only after the commit
that holds its row. A writer takes whatever is waiting when it becomes free (no timer: an idle
process writes a lone request at once), inserts it with one statement and commits. A few writers
run at a time, so one batch's commit (its fsync) does not leave the process idle while more
requests arrive. The INSERT runs in autocommit: it is its own transaction, committed when it
returns, so a batch is one round trip. Rows the statement left out (unknown or revoked device,
Idempotency-Key already used) and every row of a batch that failed for another reason than an
outage are written again one by one, so one bad row fails only its own request.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession

from app.db import Sessions, autocommit
from app.devices import repository as device_repo
from app.errors import Conflict, NotFound, Unavailable, is_infrastructure_error
from app.tasks import lifecycle
from app.tasks import repository as repo
from app.tasks.notifier import Notifier
from app.tasks.schemas import TaskRead

log = logging.getLogger(__name__)

# (the task as answered, created now: False when an Idempotency-Key replay answers an earlier one)
Outcome = tuple[TaskRead, bool]


@dataclass(slots=True)
class _Waiting:
    task: repo.NewTask
    outcome: asyncio.Future[Outcome] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class IntakeBatcher:
    def __init__(
        self,
        sessions: Sessions,
        notifier: Notifier,
        *,
        writers: int = 3,
        max_batch: int = 1000,
    ) -> None:
        self._sessions = sessions
        self._notifier = notifier
        self._max_writers = writers
        self._max_batch = max_batch
        self._waiting: list[_Waiting] = []
        self._writing = 0
        self._writers: set[asyncio.Task[None]] = set()

    async def create(self, task: repo.NewTask) -> Outcome:
        """Insert the task (with others waiting now) and commit; then hand its notice over."""
        waiting = _Waiting(task)
        self._waiting.append(waiting)
        if self._writing < self._max_writers:
            self._writing += 1
            writer = asyncio.create_task(self._write_while_waiting(), name="intake-writer")
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        return await waiting.outcome

    async def drain(self) -> None:
        """Wait for the writers running now (at shutdown, before the engine closes)."""
        await asyncio.gather(*self._writers, return_exceptions=True)

    async def _write_while_waiting(self) -> None:
        batch: list[_Waiting] = []
        try:
            # No await between the emptiness check and the decrement in `finally`: a request that
            # finds every writer busy can count on one of them taking its row.
            while self._waiting:
                batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
                await self._write(batch)
        except BaseException:  # cancelled at shutdown: nobody may wait forever
            for waiting in batch:
                _settle(waiting, Unavailable("the server is shutting down; retry"))
            raise
        finally:
            self._writing -= 1

    async def _write(self, batch: list[_Waiting]) -> None:
        try:
            async with self._sessions() as session:
                await autocommit(session)
                inserted = await repo.insert_tasks(session, [w.task for w in batch])
        except Exception as exc:
            if is_infrastructure_error(exc):
                for waiting in batch:
                    _settle(waiting, exc)
                return
            log.warning("a batch of %d tasks failed (%r); writing them one by one", len(batch), exc)
            inserted = set()
        left_out: list[_Waiting] = []
        for waiting in batch:
            if waiting.task.id in inserted:
                self._created(waiting)
            else:
                left_out.append(waiting)
        for waiting in left_out:
            await self._write_one(waiting)

    async def _write_one(self, waiting: _Waiting) -> None:
        task = waiting.task
        try:
            async with self._sessions() as session:
                await autocommit(session)
                if await repo.insert_tasks(session, [task]):
                    self._created(waiting)
                    return
                _settle(waiting, await _not_inserted(session, task))
        except Exception as exc:
            _settle(waiting, exc)

    def _created(self, waiting: _Waiting) -> None:
        task = waiting.task
        self._notifier.task_queued(task.id, task.device_id)
        _settle(waiting, (to_read(task), True))


async def _not_inserted(session: AsyncSession, task: repo.NewTask) -> Outcome | Exception:
    """Why the insert left this task out: an unknown device, or an Idempotency-Key replay."""
    device = await device_repo.get_device(session, task.device_id)
    if device is None or device.revoked_at is not None:
        return NotFound(f"device {task.device_id!r} does not exist")
    assert task.idempotency_key is not None  # nothing else leaves a row out
    existing = await repo.get_by_idempotency_key(session, task.device_id, task.idempotency_key)
    if existing is None:  # the conflicting insert was rolled back meanwhile
        return Conflict("a request with this Idempotency-Key is in flight; retry")
    if existing.request_hash != task.request_hash:
        return Conflict("this Idempotency-Key was used with a different request body")
    return TaskRead.model_validate(existing, from_attributes=True), False


def _settle(waiting: _Waiting, outcome: Outcome | BaseException) -> None:
    if waiting.outcome.done():  # the request went away (cancelled)
        return
    if isinstance(outcome, BaseException):
        waiting.outcome.set_exception(outcome)
    else:
        waiting.outcome.set_result(outcome)


def to_read(task: repo.NewTask) -> TaskRead:
    """The answer to a created task, from the values that were inserted."""
    return TaskRead(
        id=task.id,
        device_id=task.device_id,
        method=task.method,
        params=task.params,
        status=lifecycle.CREATED,
        priority=task.priority,
        attempt=0,
        max_attempts=task.max_attempts,
        version=1,
        created_at=task.created_at,
        updated_at=task.created_at,
        expires_at=task.expires_at,
    )
