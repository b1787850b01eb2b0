from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response, status

from app.auth import Scope
from app.dependencies import RuntimeDep, requires
from app.errors import API_ERRORS, problem_responses
from app.tasks import batch as batch_service
from app.tasks import service
from app.tasks.schemas import (
    DateTimeQuery,
    TaskBatchCreate,
    TaskBatchRead,
    TaskCreate,
    TaskEventRead,
    TaskFilter,
    TaskPage,
    TaskRead,
)
from swarm_device.protocol import DEVICE_ID_PATTERN, TaskStatus

# `{task_id:uuid}`: a path that is no task id (`/tasks/batch`) is not taken for one.
router = APIRouter(tags=["tasks"], responses=API_ERRORS)
NOT_FOUND = problem_responses(404)

DeviceIdPath = Annotated[str, Path(pattern=DEVICE_ID_PATTERN, description="The device id (certificate CN).")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=128,
        description="Same key and body: the same task is returned; same key, other body: 409.",
    ),
]


@router.post(
    "/devices/{device_id}/tasks",
    status_code=status.HTTP_201_CREATED,
    dependencies=[requires(Scope.TASKS_WRITE)],
    responses={
        200: {"model": TaskRead, "description": "The task of this Idempotency-Key"},
        **problem_responses(404, 409),
    },
)
async def create_task(
    device_id: DeviceIdPath,
    body: TaskCreate,
    runtime: RuntimeDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> TaskRead:
    """Queue a task for a device. Answered only after the task is committed to the database."""
    task, created = await service.create_task(runtime.intake, runtime.settings.tasks, device_id, body, idempotency_key)
    if not created:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/api/v1/tasks/{task.id}"
    return task


@router.post(
    "/tasks/batch",
    status_code=status.HTTP_201_CREATED,
    dependencies=[requires(Scope.TASKS_WRITE)],
    responses={
        200: {"model": TaskBatchRead, "description": "The batch of this Idempotency-Key"},
        **problem_responses(409),
    },
)
async def create_batch(
    body: TaskBatchCreate,
    runtime: RuntimeDep,
    request: Request,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> TaskBatchRead:
    """Queue one task (the same command) for each listed device, all in one transaction.

    Every device must exist and not be revoked, else nothing is created (422 lists the unknown
    ones). The answer says how many tasks there are and where to list them.
    """
    batch, created = await batch_service.create_batch(
        runtime.sessions,
        runtime.notifier,
        runtime.settings.tasks,
        body,
        request.app.url_path_for("list_tasks"),
        idempotency_key,
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = batch.tasks_url
    return batch


@router.get("/tasks/{task_id:uuid}", dependencies=[requires(Scope.TASKS_READ)], responses=NOT_FOUND)
async def get_task(
    task_id: uuid.UUID,
    runtime: RuntimeDep,
    wait: Annotated[float, Query(ge=0, le=300, description="Long-poll: wait up to N seconds for a final state.")] = 0,
) -> TaskRead:
    if wait > 0:
        wait_s = min(wait, runtime.settings.tasks.long_poll_max_s)
        return await service.wait_until_final(runtime.sessions, runtime.waiters, task_id, wait_s)
    return await service.get_task(runtime.sessions, task_id)


@router.get("/tasks", dependencies=[requires(Scope.TASKS_READ)])
async def list_tasks(
    runtime: RuntimeDep,
    device_id: Annotated[str | None, Query(pattern=DEVICE_ID_PATTERN)] = None,
    batch_id: uuid.UUID | None = None,
    task_status: Annotated[list[TaskStatus] | None, Query(alias="status")] = None,
    method: str | None = None,
    created_after: DateTimeQuery | None = None,
    created_before: DateTimeQuery | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> TaskPage:
    """Tasks, newest first, with cursor pagination."""
    filters = TaskFilter(
        device_id=device_id,
        batch_id=batch_id,
        status=task_status,
        method=method,
        created_after=created_after,
        created_before=created_before,
    )
    items, next_cursor = await service.list_tasks(runtime.sessions, filters, cursor, limit)
    return TaskPage(items=items, next_cursor=next_cursor)


@router.post(
    "/tasks/{task_id:uuid}/cancel", dependencies=[requires(Scope.TASKS_WRITE)], responses=problem_responses(404, 409)
)
async def cancel_task(task_id: uuid.UUID, runtime: RuntimeDep) -> TaskRead:
    """Cancel a task that is not final yet; the device gets a `task_canceled` notice."""
    return await service.cancel_task(runtime.sessions, runtime.notifier, task_id)


@router.get("/tasks/{task_id:uuid}/events", dependencies=[requires(Scope.TASKS_READ)], responses=NOT_FOUND)
async def task_events(task_id: uuid.UUID, runtime: RuntimeDep) -> list[TaskEventRead]:
    """The task's audit history: one entry per change, oldest first."""
    events = await service.list_events(runtime.sessions, task_id)
    return [TaskEventRead.model_validate(e) for e in events]
