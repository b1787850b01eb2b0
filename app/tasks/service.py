"""Task lifecycle: every transition happens here, in one transaction, committed before any publish."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from datetime import UTC, datetime, timedelta

import orjson
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import Sessions, autocommit, change_each
from app.errors import Conflict, FailedRows, InvalidInput, NotFound
from app.pagination import decode_cursor, encode_cursor
from app.settings import TaskSettings
from app.tasks import repository as repo
from app.tasks.intake import IntakeBatcher
from app.tasks.models import Task, TaskEvent
from app.tasks.notifier import Notifier
from app.tasks.schemas import TaskCreate, TaskFilter, TaskRead
from app.tasks.waiters import TaskWaiters
from swarm_device.protocol import PENDING_STATUSES, ProgressParams, ResultParams, TaskStatus

log = logging.getLogger(__name__)


def to_read(task: Task) -> TaskRead:
    return TaskRead.model_validate(task, from_attributes=True)


def request_hash(body: BaseModel) -> str:
    """What an Idempotency-Key is compared with: a digest of the canonical request body."""
    return hashlib.sha256(orjson.dumps(body.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)).hexdigest()


def new_task(
    settings: TaskSettings,
    device_id: str,
    body: TaskCreate,
    idempotency_key: str | None = None,
    hashed_request: str | None = None,
) -> repo.NewTask:
    """A QUEUED task made from a request body, not written yet; checks params size."""
    params_json = orjson.dumps(body.params)
    if len(params_json) > settings.max_params_bytes:
        raise InvalidInput(f"params exceed {settings.max_params_bytes} bytes")
    now = datetime.now(UTC)
    return repo.NewTask(
        id=uuid.uuid4(),
        device_id=device_id,
        method=body.method,
        params=body.params,
        params_json=params_json.decode(),
        priority=body.priority,
        max_attempts=body.max_attempts or settings.default_max_attempts,
        timeout_s=body.timeout_s or settings.default_timeout_s,
        created_at=now,
        expires_at=now + timedelta(seconds=body.ttl_s) if body.ttl_s else None,
        idempotency_key=idempotency_key,
        request_hash=hashed_request,
    )


async def create_task(
    intake: IntakeBatcher,
    settings: TaskSettings,
    device_id: str,
    body: TaskCreate,
    idempotency_key: str | None = None,
) -> tuple[TaskRead, bool]:
    """Persist a task (QUEUED), committed with whatever else waits to be created in this process;
    its notice goes to the notifier after the commit.

    Returns the task and whether it was created now (False: an earlier request with the same
    Idempotency-Key and the same body created it).
    """
    hashed = request_hash(body) if idempotency_key else None
    return await intake.create(new_task(settings, device_id, body, idempotency_key, hashed))


async def get_task(sessions: Sessions, task_id: uuid.UUID) -> TaskRead:
    async with sessions() as session:
        task = await repo.get_task(session, task_id)
    if task is None:
        raise NotFound(f"task {task_id} does not exist")
    return to_read(task)


async def list_tasks(
    sessions: Sessions, filters: TaskFilter, cursor: str | None, limit: int
) -> tuple[list[TaskRead], str | None]:
    after = decode_cursor(cursor) if cursor else None
    async with sessions() as session:
        rows = await repo.list_tasks(session, filters, after, limit)
    items = [to_read(t) for t in rows]
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if len(rows) == limit else None
    return items, next_cursor


async def list_events(sessions: Sessions, task_id: uuid.UUID) -> list[TaskEvent]:
    async with sessions() as session:
        if await repo.get_task(session, task_id) is None:
            raise NotFound(f"task {task_id} does not exist")
        return list(await repo.list_events(session, task_id))


async def cancel_task(sessions: Sessions, notifier: Notifier, task_id: uuid.UUID) -> TaskRead:
    async with sessions() as session:
        task = await repo.get_task(session, task_id, lock=True)
        if task is None:
            raise NotFound(f"task {task_id} does not exist")
        if TaskStatus(task.status).is_final:
            raise Conflict(f"task is already {task.status}")
        repo.set_status(task, TaskStatus.CANCELED)
        await session.commit()
    # Tell the device whatever the state was: it may have pulled the task just before the cancel.
    notifier.task_canceled(task.id, task.device_id)
    return to_read(task)


# --- the device side -------------------------------------------------------------------------


async def next_task(sessions: Sessions, device_id: str) -> TaskRead | None:
    """The device's current task: its IN_PROGRESS one, else the next pending one (handed out now)."""
    async with sessions() as session:
        await autocommit(session)
        try:
            task = await repo.current_or_claim(session, device_id)
        except IntegrityError:
            # Another consumer handed out a task to this device at the same moment: show that one.
            task = await repo.in_progress_task(session, device_id)
    return to_read(task) if task is not None else None


async def _locked_task_of(session: AsyncSession, device_id: str, task_id: uuid.UUID) -> Task:
    task = await repo.get_task(session, task_id, lock=True)
    # Another device's task is reported as unknown: a device learns nothing about others.
    if task is None or task.device_id != device_id:
        raise NotFound(f"task {task_id} does not exist")
    return task


async def report_progress(sessions: Sessions, device_id: str, task_id: uuid.UUID, params: ProgressParams) -> TaskRead:
    async with sessions() as session:
        task = await _locked_task_of(session, device_id, task_id)
        if task.status != TaskStatus.IN_PROGRESS:
            raise Conflict(f"task is {task.status}, not in_progress")
        task = await repo.extend_deadline(session, task, params.status_details)
        await session.commit()
    return to_read(task)


async def report_result(sessions: Sessions, device_id: str, task_id: uuid.UUID, params: ResultParams) -> TaskRead:
    status = TaskStatus(params.status)
    async with sessions() as session:
        await autocommit(session)
        finished = await repo.finish_in_progress(session, device_id, task_id, status, params.result, params.error)
    if finished is not None:
        return to_read(finished)
    # Not in progress: find out why under a lock (or answer a retried report again).
    async with sessions() as session:
        task = await _locked_task_of(session, device_id, task_id)
        current = TaskStatus(task.status)
        if current.is_final:
            if _same_report(task, params):
                return to_read(task)  # a retried report: answer it again, change nothing
            raise Conflict(f"task is already {task.status}")
        if current in PENDING_STATUSES:
            raise Conflict(f"task is {task.status}: it was not handed out (call tasks/next)")
        repo.set_status(task, status, result=params.result, error=params.error)
        await session.commit()
    return to_read(task)


def _same_report(task: Task, params: ResultParams) -> bool:
    return task.status == params.status and task.result == params.result and task.error == params.error


# --- periodic jobs -------------------------------------------------------------------------


# The periodic jobs' names in FailedRows.
DEADLINES = "deadlines"
EXPIRY = "expiry"


def _time_out(task: Task) -> None:
    if task.attempt < task.max_attempts:
        repo.set_status(task, TaskStatus.QUEUED, deadline_at=None, notice_due_at=datetime.now(UTC))
    else:
        repo.set_status(task, TaskStatus.TIMED_OUT, error={"message": "no result before the deadline"})


def _task_id(task: Task) -> uuid.UUID:
    return task.id


def _expire(task: Task) -> None:
    repo.set_status(task, TaskStatus.EXPIRED)


async def time_out_overdue(sessions: Sessions, notifier: Notifier, failed: FailedRows, batch: int = 500) -> int:
    """IN_PROGRESS past its deadline: QUEUED again (same id, so the device can deduplicate) while
    attempts remain, else TIMED_OUT. A task that cannot be changed is left out (`failed`)."""
    async with sessions() as session:
        tasks = await repo.lock_overdue(session, batch, skip=failed.of(DEADLINES))
        changed = await change_each(
            session, tasks, _time_out, _task_id, lambda task_id, exc: failed.add(DEADLINES, task_id, exc)
        )
        requeued = [(task.id, task.device_id) for task in changed if task.status == TaskStatus.QUEUED]
        await session.commit()
    for task_id, device_id in requeued:
        notifier.task_queued(task_id, device_id)
    return len(changed)


async def expire_pending(sessions: Sessions, failed: FailedRows, batch: int = 500) -> int:
    """Pending past their expiry: EXPIRED. A task that cannot be changed is left out (`failed`)."""
    async with sessions() as session:
        tasks = await repo.lock_expired(session, batch, skip=failed.of(EXPIRY))
        changed = await change_each(
            session, tasks, _expire, _task_id, lambda task_id, exc: failed.add(EXPIRY, task_id, exc)
        )
        await session.commit()
    return len(changed)


async def resend_notices(sessions: Sessions, notifier: Notifier, older_than_s: float, chunk: int = 5000) -> int:
    """Hand the notices never confirmed back to the notifier's bulk lane, as many as it has room
    for: the overflow of a large batch goes out at the notifier's pace (not a fixed number per run
    of the job), and behind every fresh single task's notice."""
    handed_back = 0
    while (room := min(notifier.bulk_room(), chunk)) > 0:
        async with sessions() as session:
            due = await repo.notices_due(session, older_than_s, room, lease_s=notifier.bulk_lease_s(room))
            await session.commit()
        notifier.tasks_queued_in_bulk(due, leased=True)
        handed_back += len(due)
        if len(due) < room:
            break
    return handed_back


async def wait_until_final(sessions: Sessions, waiters: TaskWaiters, task_id: uuid.UUID, wait_s: float) -> TaskRead:
    """The task once final, or as it stands after wait_s seconds (long-poll)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    with waiters.watch(task_id) as finished:
        while True:
            task = await get_task(sessions, task_id)
            remaining = deadline - loop.time()
            if task.status.is_final or remaining <= 0:
                return task
            # Re-read now and then even without a wake-up: wake-ups are a hint, not the truth.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), min(remaining, 5.0))


async def cancel_open_tasks_in(session: AsyncSession, device_id: str) -> list[uuid.UUID]:
    """Cancel every non-final task of a device inside the caller's transaction (revocation)."""
    tasks = await repo.lock_pending_of_device(session, device_id)
    for task in tasks:
        repo.set_status(task, TaskStatus.CANCELED, error={"message": "device revoked"})
    return [task.id for task in tasks]
