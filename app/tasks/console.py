"""The console's task pages: tasks across the fleet with filters (status, device, method), a
device's tasks with their history, creating a task or a batch, cancelling. Rows refresh when the
event stream reports a change of any task."""

from __future__ import annotations

import re
import uuid
from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import ValidationError

from app.auth import Principal, Scope
from app.console.pages import ConsolePage, NavEntry, form_fields, render
from app.dependencies import RuntimeDep, requires
from app.errors import InvalidInput
from app.tasks import batch as batch_service
from app.tasks import service
from app.tasks.schemas import TaskBatchCreate, TaskCreate, TaskFilter
from swarm_device.protocol import DEVICE_ID_PATTERN, TaskStatus

router = APIRouter(prefix="/tasks")

Reader = Annotated[Principal, requires(Scope.TASKS_READ)]
Writer = Annotated[Principal, requires(Scope.TASKS_WRITE)]

# Every task event of the stream (app/events/service.py names them): each may change a row.
TASK_EVENTS = ", ".join(f"sse:task.{kind}" for kind in ["created", "progress", *TaskStatus])
PAGE_SIZE = 100


def _filters(device_id: str | None, status: str | None, method: str | None) -> TaskFilter:
    # An empty field of the filter form means "any".
    return TaskFilter(
        device_id=device_id or None, status=[TaskStatus(status)] if status else None, method=method or None
    )


StatusQuery = Annotated[str | None, Query(pattern="^(" + "|".join(TaskStatus) + ")?$")]
# The filter form sends empty fields for "any".
DeviceQuery = Annotated[str | None, Query(pattern="^(" + DEVICE_ID_PATTERN.strip("^$") + ")?$")]


@router.get("")
async def tasks_page(
    request: Request,
    principal: Reader,
    device_id: DeviceQuery = None,
    status: StatusQuery = None,
    method: str | None = None,
) -> HTMLResponse:
    context = {
        "filters": {"device_id": device_id or "", "status": status or "", "method": method or ""},
        "statuses": list(TaskStatus),
        "triggers": TASK_EVENTS,
    }
    return render(request, "tasks.html", principal, context)


@router.get("/rows")
async def task_rows(
    request: Request,
    principal: Reader,
    runtime: RuntimeDep,
    device_id: DeviceQuery = None,
    status: StatusQuery = None,
    method: str | None = None,
    history: bool = False,
) -> HTMLResponse:
    """The table's rows; with `history`, each task's audit events under it (a device's page)."""
    items, more = await service.list_tasks(runtime.sessions, _filters(device_id, status, method), None, PAGE_SIZE)
    events = {task.id: await service.list_events(runtime.sessions, task.id) for task in items} if history else {}
    return render(request, "_task_rows.html", principal, {"tasks": items, "events": events, "more": more is not None})


@router.get("/{task_id}/history")
async def task_history(task_id: uuid.UUID, request: Request, principal: Reader, runtime: RuntimeDep) -> HTMLResponse:
    events = await service.list_events(runtime.sessions, task_id)
    return render(request, "_task_history.html", principal, {"events": events, "task_id": task_id})


def _command(fields: dict[str, str]) -> dict[str, object]:
    """The form's method, params (a JSON object) and optional limits, as TaskCreate's fields."""
    try:
        params = orjson.loads(fields.get("params") or "{}")
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"params is not JSON: {exc}.") from exc
    command: dict[str, object] = {"method": fields.get("method", "").strip(), "params": params}
    for name in ("priority", "timeout_s", "ttl_s", "max_attempts"):
        if fields.get(name, "").strip():
            command[name] = fields[name].strip()
    return command


def _invalid(exc: ValidationError) -> InvalidInput:
    return InvalidInput("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))


@router.post("")
async def create_task(request: Request, principal: Writer, runtime: RuntimeDep) -> HTMLResponse:
    fields = await form_fields(request)
    try:
        body = TaskCreate.model_validate(_command(fields))
    except ValidationError as exc:
        raise _invalid(exc) from exc
    device_id = fields.get("device_id", "").strip()
    if not re.fullmatch(DEVICE_ID_PATTERN, device_id):
        raise InvalidInput(f"device_id {device_id!r} is not a device id.")
    task, _ = await service.create_task(runtime.intake, runtime.settings.tasks, device_id, body)
    return render(
        request, "_flash.html", principal, {"message": f"Task {task.id} ({task.method}) queued for {device_id}."}
    )


@router.post("/batch")
async def create_batch(request: Request, principal: Writer, runtime: RuntimeDep) -> HTMLResponse:
    fields = await form_fields(request)
    device_ids = fields.get("device_ids", "").replace(",", " ").split()
    try:
        body = TaskBatchCreate.model_validate(_command(fields) | {"device_ids": device_ids})
    except ValidationError as exc:
        raise _invalid(exc) from exc
    tasks_url = request.app.url_path_for("list_tasks")
    batch, _ = await batch_service.create_batch(
        runtime.sessions, runtime.notifier, runtime.settings.tasks, body, tasks_url
    )
    message = f"Batch {batch.id}: {batch.task_count} tasks ({body.method}) queued."
    return render(request, "_flash.html", principal, {"message": message})


@router.post("/{task_id}/cancel")
async def cancel(task_id: uuid.UUID, request: Request, principal: Writer, runtime: RuntimeDep) -> HTMLResponse:
    task = await service.cancel_task(runtime.sessions, runtime.notifier, task_id)
    return render(request, "_flash.html", principal, {"message": f"Task {task.id} {task.status}."})


PAGE = ConsolePage(router, (NavEntry("Tasks", "/tasks", Scope.TASKS_READ),))
