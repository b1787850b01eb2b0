from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Path, Query, Response, status

from app.auth import Principal, Scope
from app.dependencies import Runtime, RuntimeDep, requires
from app.errors import API_ERRORS, NOT_FOUND, problem_responses
from app.pagination import decode_cursor, encode_cursor
from app.processes import service
from app.processes.definition import NAME_PATTERN, PG_INT_MAX
from app.processes.schemas import (
    DefinitionCreate,
    DefinitionRead,
    InstanceCreate,
    InstanceDetail,
    InstancePage,
    InstanceRead,
    StepComplete,
    StepRead,
    TriggerCreate,
    TriggerRead,
)
from swarm_device.protocol import DEVICE_ID_PATTERN

router = APIRouter(prefix="/processes", tags=["processes"], responses=API_ERRORS)

NamePath = Annotated[str, Path(pattern=NAME_PATTERN)]
Reader = Annotated[Principal, requires(Scope.PROCESSES_READ)]
Writer = Annotated[Principal, requires(Scope.PROCESSES_WRITE)]
Worker = Annotated[Principal, requires(Scope.PROCESSES_WORK)]


def _deps(runtime: Runtime) -> service.Deps:
    return service.Deps(runtime.sessions, runtime.settings, runtime.notifier)


@router.post("/definitions", status_code=status.HTTP_201_CREATED, responses=problem_responses(409))
async def create_definition(body: DefinitionCreate, runtime: RuntimeDep, principal: Writer) -> DefinitionRead:
    """Store a definition as the next version of its name. One that cannot run is refused with
    422 and `problems`: every unreachable step, outcome leading nowhere, cycle without a way out,
    unknown role, recipient group or sub-process."""
    return await service.create_definition(_deps(runtime), body, principal)


@router.get("/definitions")
async def list_definitions(runtime: RuntimeDep, _: Reader) -> list[DefinitionRead]:
    """The newest version of every definition."""
    return await service.list_definitions(_deps(runtime), None)


@router.get("/definitions/{name}", responses=NOT_FOUND)
async def get_definition(name: NamePath, runtime: RuntimeDep, _: Reader) -> DefinitionRead:
    """The newest version."""
    return await service.get_definition(_deps(runtime), name, None)


@router.get("/definitions/{name}/versions", responses=NOT_FOUND)
async def list_versions(name: NamePath, runtime: RuntimeDep, _: Reader) -> list[DefinitionRead]:
    return await service.list_definitions(_deps(runtime), name)


@router.get("/definitions/{name}/versions/{version}", responses=NOT_FOUND)
async def get_version(
    name: NamePath, version: Annotated[int, Path(ge=1, le=PG_INT_MAX)], runtime: RuntimeDep, _: Reader
) -> DefinitionRead:
    return await service.get_definition(_deps(runtime), name, version)


@router.post("/instances", status_code=status.HTTP_201_CREATED, responses=problem_responses(404, 409))
async def start_instance(
    body: InstanceCreate,
    runtime: RuntimeDep,
    principal: Writer,
    response: Response,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=128)] = None,
) -> InstanceRead:
    """Start an instance (for a device, with input); it keeps the version it started with."""
    key = f"api:{idempotency_key}" if idempotency_key else None
    instance = await service.start_instance(_deps(runtime), body, start_key=key, actor=principal.subject)
    response.headers["Location"] = f"/api/v1/processes/instances/{instance.id}"
    return instance


@router.get("/instances")
async def list_instances(
    runtime: RuntimeDep,
    _: Reader,
    instance_status: Annotated[
        Literal["running", "completed", "failed", "canceled"] | None, Query(alias="status")
    ] = None,
    definition: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    device_id: Annotated[str | None, Query(pattern=DEVICE_ID_PATTERN)] = None,
    cursor: Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> InstancePage:
    """Newest first, a page at a time."""
    items = await service.list_instances(
        _deps(runtime),
        status=instance_status,
        name=definition,
        device_id=device_id,
        before=decode_cursor(cursor) if cursor else None,
        limit=limit,
    )
    last = items[-1] if len(items) == limit else None
    return InstancePage(items=items, next_cursor=encode_cursor(last.created_at, last.id) if last else None)


@router.get("/instances/{instance_id}", responses=NOT_FOUND)
async def get_instance(instance_id: uuid.UUID, runtime: RuntimeDep, _: Reader) -> InstanceDetail:
    """The instance with its steps (open and ended) and its full history."""
    return await service.get_instance(_deps(runtime), instance_id)


@router.post("/instances/{instance_id}/cancel", responses=problem_responses(404, 409))
async def cancel_instance(instance_id: uuid.UUID, runtime: RuntimeDep, principal: Writer) -> InstanceDetail:
    """Cancel a running instance and its sub-processes (device tasks already queued keep running)."""
    return await service.cancel_instance(_deps(runtime), instance_id, principal)


@router.post("/instances/{instance_id}/steps/{step_id}/complete", responses=problem_responses(404, 409))
async def complete_step(
    instance_id: uuid.UUID,
    step_id: Annotated[int, Path(ge=1, le=PG_INT_MAX)],
    body: StepComplete,
    runtime: RuntimeDep,
    principal: Worker,
) -> InstanceDetail:
    """Complete an open human step with one of its outcomes; the token needs the step's role
    (scope `role:<name>`). A step already completed answers 409."""
    return await service.complete_human_step(_deps(runtime), instance_id, step_id, body.outcome, body.output, principal)


@router.get("/work")
async def work_list(
    runtime: RuntimeDep,
    principal: Worker,
    role: Annotated[str | None, Query(pattern=r"^[a-z][a-z0-9_-]{0,63}$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[StepRead]:
    """Open human steps of `role` (default: every role the token holds), oldest first."""
    return await service.work_list(_deps(runtime), principal, role, limit)


@router.post("/triggers", status_code=status.HTTP_201_CREATED, responses=problem_responses(404))
async def create_trigger(body: TriggerCreate, runtime: RuntimeDep, _: Writer) -> TriggerRead:
    """Start instances by themselves: for each task reaching a final status (of a method, in
    some statuses), each device going offline, or each reported state matching a condition."""
    return await service.create_trigger(_deps(runtime), body)


@router.get("/triggers")
async def list_triggers(runtime: RuntimeDep, _: Reader) -> list[TriggerRead]:
    return await service.list_triggers(_deps(runtime))
