"""The task methods devices call over MQTT (see DESIGN.md section 4)."""

from __future__ import annotations

import uuid

from app.db import Sessions
from app.device_rpc import DeviceRequest, DeviceRpcRouter
from app.errors import NotFound
from app.tasks import service
from app.tasks.schemas import TaskRead
from swarm_device.protocol import FinishedTask, NoParams, ProgressParams, ResultParams


def _task_id(request: DeviceRequest[ProgressParams] | DeviceRequest[ResultParams]) -> uuid.UUID:
    try:
        return uuid.UUID(request.path["task_id"])
    except ValueError:
        raise NotFound(f"task {request.path['task_id']} does not exist") from None


def register(rpc: DeviceRpcRouter, sessions: Sessions) -> None:
    @rpc.method("tasks/next", NoParams)
    async def next_task(request: DeviceRequest[NoParams]) -> TaskRead | None:
        """The device's current task (its in-progress one, else the next by priority and age), or null."""
        return await service.next_task(sessions, request.device_id)

    @rpc.method("tasks/{task_id}/progress", ProgressParams)
    async def progress(request: DeviceRequest[ProgressParams]) -> TaskRead:
        """Progress of an in-progress task; extends its deadline by its step timeout."""
        return await service.report_progress(sessions, request.device_id, _task_id(request), request.params)

    @rpc.method("tasks/{task_id}/result", ResultParams)
    async def result(request: DeviceRequest[ResultParams]) -> TaskRead | FinishedTask:
        """The final report of a task; a repeated identical report is answered again. With `next`,
        the reply also hands out the device's next task (`next_task`), as `tasks/next` would."""
        finished = await service.report_result(sessions, request.device_id, _task_id(request), request.params)
        if not request.params.next:
            return finished
        handed_out = await service.next_task(sessions, request.device_id)
        return FinishedTask.model_construct(**dict(finished), next_task=handed_out)
