"""The console's process pages: the work list (open human steps of the roles the signed-in token
holds, grouped by role, each with a button per outcome) and one instance (where it stands: its
status, its steps open and ended, its history). Both refresh when the event stream reports a
process or step event; completing a step goes through the same service as the API."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.auth import Principal, Scope, holds_role
from app.console.pages import ConsolePage, NavEntry, form_fields, render
from app.dependencies import Runtime, RuntimeDep, requires
from app.processes import service
from app.processes.definition import Definition, HumanStep
from app.processes.schemas import InstanceDetail, InstanceRead, StepRead

router = APIRouter(prefix="/processes")

Reader = Annotated[Principal, requires(Scope.PROCESSES_READ)]
Worker = Annotated[Principal, requires(Scope.PROCESSES_WORK)]

# The stream's process events (app/processes/service.py records them) that change these pages.
PROCESS_EVENTS = ", ".join(
    f"sse:{kind}"
    for kind in [
        "process.started",
        "process.completed",
        "process.failed",
        "process.canceled",
        "step.opened",
        "step.completed",
        "step.passed",
        "step.arrived",
    ]
)
PAGE_SIZE = 200


@dataclass(frozen=True)
class WorkItem:
    """An open human step with what its row shows: its instance (device) and its declaration."""

    step: StepRead
    instance: InstanceRead
    declared: HumanStep | None


def _deps(runtime: Runtime) -> service.Deps:
    return service.Deps(runtime.sessions, runtime.settings, runtime.notifier)


async def _definition(runtime: Runtime, instance: InstanceRead) -> Definition:
    return (await service.get_definition(_deps(runtime), instance.name, instance.version)).definition


def _human(definition: Definition, step: str) -> HumanStep | None:
    declared = definition.steps.get(step)
    return declared if isinstance(declared, HumanStep) else None


@router.get("/work")
async def work_page(request: Request, principal: Worker) -> HTMLResponse:
    return render(request, "worklist.html", principal, {"triggers": PROCESS_EVENTS})


@router.get("/work/rows")
async def work_rows(request: Request, principal: Worker, runtime: RuntimeDep) -> HTMLResponse:
    """The open steps of every role the token holds, by role (a held role without steps too)."""
    roles = [role for role in runtime.settings.processes.roles if holds_role(principal, role)]
    steps = await service.work_list(_deps(runtime), principal, None, PAGE_SIZE)
    instances: dict[uuid.UUID, InstanceDetail] = {}
    definitions: dict[uuid.UUID, Definition] = {}
    groups: dict[str, list[WorkItem]] = {role: [] for role in roles}
    for step in steps:
        if step.instance_id not in instances:
            instance = instances[step.instance_id] = await service.get_instance(_deps(runtime), step.instance_id)
            definitions[step.instance_id] = await _definition(runtime, instance)
        item = WorkItem(step, instances[step.instance_id], _human(definitions[step.instance_id], step.step))
        groups.setdefault(step.role or "", []).append(item)
    context = {"groups": groups, "shown": len(steps), "more": len(steps) == PAGE_SIZE}
    return render(request, "_work_rows.html", principal, context)


async def _instance_context(runtime: Runtime, instance_id: uuid.UUID) -> dict[str, object]:
    instance = await service.get_instance(_deps(runtime), instance_id)
    definition = await _definition(runtime, instance)
    declared = {step.step: _human(definition, step.step) for step in instance.steps}
    return {"instance": instance, "declarations": declared, "title": definition.title}


@router.get("/instances/{instance_id}")
async def instance_page(
    instance_id: uuid.UUID, request: Request, principal: Reader, runtime: RuntimeDep
) -> HTMLResponse:
    context = await _instance_context(runtime, instance_id) | {"triggers": PROCESS_EVENTS}
    return render(request, "process_instance.html", principal, context)


@router.get("/instances/{instance_id}/state")
async def instance_state(
    instance_id: uuid.UUID, request: Request, principal: Reader, runtime: RuntimeDep
) -> HTMLResponse:
    return render(request, "_instance_state.html", principal, await _instance_context(runtime, instance_id))


@router.post("/instances/{instance_id}/steps/{step_id}/complete")
async def complete_step(
    instance_id: uuid.UUID, step_id: int, request: Request, principal: Worker, runtime: RuntimeDep
) -> HTMLResponse:
    """One of the step's outcomes, as the API's complete-step (the role check is the service's)."""
    outcome = (await form_fields(request)).get("outcome", "")
    instance = await service.complete_human_step(_deps(runtime), instance_id, step_id, outcome, {}, principal)
    step = next(s for s in instance.steps if s.id == step_id)
    message = f"Step {step.step} of {instance.name} ({instance.device_id or 'no device'}): {outcome}."
    return render(request, "_flash.html", principal, {"message": message})


PAGE = ConsolePage(router, (NavEntry("Work", "/processes/work", Scope.PROCESSES_WORK),))
