"""Batch dispatch: one task for each of many devices, in one transaction, notices in bulk.

The tasks are inserted with one INSERT ... SELECT joined to the devices that exist and are not
revoked (the audit trigger writes their first events): if a device is missing from its answer, the
batch is rolled back and refused. Then committed, and only then handed to the notifier's bulk lane
(sent after single tasks' notices), which publishes with confirms in flight and marks them SENT in
bulk; their notices are due for a re-send only after the time the lane needs to send them. An
Idempotency-Key names the batch: the same key and body answer the same batch, another body is a
conflict.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import NoReturn

from sqlalchemy.exc import IntegrityError

from app.db import Sessions
from app.errors import Conflict, InvalidInput
from app.settings import TaskSettings
from app.tasks import repository as repo
from app.tasks.models import TaskBatch
from app.tasks.notifier import Notifier
from app.tasks.schemas import TaskBatchCreate, TaskBatchRead
from app.tasks.service import new_task, request_hash

# Unknown device ids named in a refusal, at most.
MAX_LISTED_UNKNOWN = 100


def to_read(batch: TaskBatch, tasks_path: str) -> TaskBatchRead:
    return TaskBatchRead(
        id=batch.id,
        task_count=batch.task_count,
        created_at=batch.created_at,
        tasks_url=f"{tasks_path}?batch_id={batch.id}",
    )


async def create_batch(
    sessions: Sessions,
    notifier: Notifier,
    settings: TaskSettings,
    body: TaskBatchCreate,
    tasks_path: str,
    idempotency_key: str | None = None,
) -> tuple[TaskBatchRead, bool]:
    """Queue one task per device in one transaction and commit; then hand the notices over.

    Every device must exist and not be revoked, else nothing is created (InvalidInput lists the
    unknown ones). Returns the batch and whether it was created now (False: replayed by key).
    """
    hashed = request_hash(body)
    template = new_task(settings, "", body)
    batch = TaskBatch(
        id=uuid.uuid4(),
        idempotency_key=idempotency_key,
        request_hash=hashed,
        task_count=len(body.device_ids),
        created_at=datetime.now(UTC),
    )
    async with sessions() as session:
        if idempotency_key is not None and (earlier := await repo.get_batch_by_key(session, idempotency_key)):
            return _replayed(earlier, hashed, tasks_path), False
        try:
            lease_s = notifier.bulk_lease_s(len(body.device_ids))
            notice_due_at = batch.created_at + timedelta(seconds=lease_s)
            created = await repo.insert_batch_tasks(session, batch, template, body.device_ids, notice_due_at)
            if len(created) < len(body.device_ids):
                await session.rollback()
                _refuse_unknown(body.device_ids, created)
            await session.commit()
        except IntegrityError:
            if idempotency_key is None:
                raise
            # The same key committed by a concurrent request meanwhile.
            await session.rollback()
            earlier = await repo.get_batch_by_key(session, idempotency_key)
            if earlier is None:
                raise Conflict("a request with this Idempotency-Key is in flight; retry") from None
            return _replayed(earlier, hashed, tasks_path), False
    notifier.tasks_queued_in_bulk(created, leased=lease_s > 0)
    return to_read(batch, tasks_path), True


def _refuse_unknown(device_ids: list[str], created: list[tuple[uuid.UUID, str]]) -> NoReturn:
    made = {device_id for _, device_id in created}
    unknown = [d for d in device_ids if d not in made]
    raise InvalidInput(
        f"{len(unknown)} device(s) do not exist or are revoked; no task was created",
        unknown_device_ids=unknown[:MAX_LISTED_UNKNOWN],
    )


def _replayed(batch: TaskBatch, hashed: str, tasks_path: str) -> TaskBatchRead:
    if batch.request_hash != hashed:
        raise Conflict("this Idempotency-Key was used with a different request body")
    return to_read(batch, tasks_path)
