"""Process lifecycle: definitions, instances and their steps. Every change of an instance
happens under its row lock (`repository.lock_instance`) in one transaction, through the
engine's effects, committed before any notice is published.

Exactly once: a waiting step ends only while it is `open`, checked under the instance's lock;
what ended it is recorded with an event key unique per instance, so a redelivered event (a job
run in several processes, a retried request) finds the step ended and changes nothing.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import Principal, holds_role
from app.db import Sessions
from app.errors import Conflict, Forbidden, InvalidInput, NotFound
from app.processes import engine, expressions
from app.processes import repository as repo
from app.processes.definition import Definition, HumanStep
from app.processes.models import (
    ProcessDefinition,
    ProcessEvent,
    ProcessInstance,
    ProcessOutbox,
    ProcessStep,
    ProcessTrigger,
)
from app.processes.schemas import (
    DefinitionCreate,
    DefinitionRead,
    InstanceCreate,
    InstanceDetail,
    InstanceRead,
    StepRead,
    TriggerCreate,
    TriggerRead,
)
from app.settings import Settings
from app.tasks import repository as task_repo
from app.tasks import service as tasks
from app.tasks.notifier import Notifier
from app.tasks.schemas import TaskCreate

log = logging.getLogger(__name__)

# Waiting steps whose end `_end_waiting_step` records (with its event key).
_RECORDED_WHEN_ENDED = frozenset({"human", "device_task", "timer", "subprocess"})
# A gap in the event log younger than this may still fill (a transaction commits late).
TRIGGER_GAP_WAIT_S = 5.0

# Definitions never change once stored: parsed once per process.
_PARSED: dict[uuid.UUID, Definition] = {}


@dataclass(frozen=True)
class Deps:
    """What the service needs: the API and the jobs build it from the Runtime."""

    sessions: Sessions
    settings: Settings
    # Told about device tasks created by steps, after the commit (None: the re-send job tells).
    notifier: Notifier | None = None


def parsed(row: ProcessDefinition) -> Definition:
    definition = _PARSED.get(row.id)
    if definition is None:
        definition = _PARSED[row.id] = Definition.model_validate(row.body)
    return definition


def to_definition_read(row: ProcessDefinition) -> DefinitionRead:
    return DefinitionRead(
        id=row.id,
        name=row.name,
        version=row.version,
        definition=parsed(row),
        created_by=row.created_by,
        created_at=row.created_at,
    )


# --- definitions -----------------------------------------------------------------------------------


async def create_definition(deps: Deps, body: DefinitionCreate, principal: Principal) -> DefinitionRead:
    """Store `body` as the next version of its name; 422 listing every problem if it cannot run."""
    async with deps.sessions() as session:
        known = await repo.definition_names(session)
        found = engine.problems(body.name, body.definition, deps.settings.processes.roles, known)
        if found:
            raise InvalidInput(f"The definition cannot run: {len(found)} problem(s).", problems=found)
        row = ProcessDefinition(
            id=uuid.uuid4(),
            name=body.name,
            version=await repo.newest_version(session, body.name) + 1,
            body=body.definition.model_dump(mode="json", exclude_none=True),
            created_by=principal.subject,
        )
        session.add(row)
        try:
            await session.commit()
        except IntegrityError as exc:
            raise Conflict(f"another version of {body.name!r} was stored at the same moment; send it again") from exc
    return to_definition_read(row)


async def get_definition(deps: Deps, name: str, version: int | None) -> DefinitionRead:
    async with deps.sessions() as session:
        row = await repo.get_definition(session, name, version)
    if row is None:
        raise NotFound(f"process definition {name!r}" + (f" version {version}" if version else "") + " does not exist")
    return to_definition_read(row)


async def list_definitions(deps: Deps, name: str | None) -> list[DefinitionRead]:
    async with deps.sessions() as session:
        return [to_definition_read(row) for row in await repo.list_definitions(session, name)]


# --- instances -----------------------------------------------------------------------------------------


@dataclass
class _Work:
    """What one transaction did that the commit must be followed by."""

    tasks: list[tuple[uuid.UUID, str]] = field(default_factory=list)


async def start_instance(
    deps: Deps, body: InstanceCreate, *, start_key: str | None = None, actor: str | None = None
) -> InstanceRead:
    """Start an instance of the definition's given (or newest) version; with a `start_key`
    already used, the instance it started is answered instead."""
    work = _Work()
    async with deps.sessions() as session:
        if start_key is not None and (earlier := await repo.instance_by_start_key(session, start_key)) is not None:
            return InstanceRead.model_validate(earlier)
        instance = await _start(deps, session, work, body, start_key=start_key, actor=actor)
        try:
            await session.commit()
        except IntegrityError:
            await session.rollback()
            if start_key is None:
                raise
            # The same key started an instance at the same moment elsewhere: answer that one.
            earlier = await repo.instance_by_start_key(session, start_key)
            if earlier is None:
                raise
            return InstanceRead.model_validate(earlier)
    _after_commit(deps, work)
    return InstanceRead.model_validate(instance)


async def _start(
    deps: Deps,
    session: AsyncSession,
    work: _Work,
    body: InstanceCreate,
    *,
    start_key: str | None = None,
    actor: str | None = None,
    parent: ProcessStep | None = None,
) -> ProcessInstance:
    row = await repo.get_definition(session, body.definition, body.version)
    if row is None:
        raise NotFound(f"process definition {body.definition!r} does not exist")
    definition = parsed(row)
    instance = ProcessInstance(
        id=uuid.uuid4(),
        definition_id=row.id,
        name=row.name,
        version=row.version,
        device_id=body.device_id,
        status="running",
        data={},
        parent_id=parent.instance_id if parent else None,
        parent_step_id=parent.id if parent else None,
        start_key=start_key,
    )
    session.add(instance)
    # The instance row first: the steps and the history refer to it.
    await session.flush()
    _record(session, instance, "process.started", None, {"version": row.version, "actor": actor, "input": body.input})
    context = await _context(session, instance, definition)
    plan = engine.start(definition, context, {"input": body.input})
    await _apply(deps, session, work, instance, definition, plan)
    return instance


async def _context(session: AsyncSession, instance: ProcessInstance, definition: Definition) -> engine.Context:
    # The device's state is read only for definitions whose steps can look at it.
    state = await repo.reported_state(session, instance.device_id) if engine.reads_state(definition) else {}
    return engine.Context(instance_id=str(instance.id), device_id=instance.device_id, state=state)


def _record(
    session: AsyncSession,
    instance: ProcessInstance,
    kind: str,
    step: str | None,
    details: dict[str, Any] | None = None,
    key: str | None = None,
) -> None:
    session.add(
        ProcessEvent(
            instance_id=instance.id, device_id=instance.device_id, type=kind, step=step, details=details, event_key=key
        )
    )


async def _apply(
    deps: Deps,
    session: AsyncSession,
    work: _Work,
    instance: ProcessInstance,
    definition: Definition,
    plan: engine.Plan,
) -> None:
    """Write the effects of one advance (steps to wait on, tasks, notifications, the end)."""
    instance.data = plan.data
    instance.updated_at = datetime.now(UTC)
    now = datetime.now(UTC)
    # Device tasks whose device cannot take them end at once, as `rejected`.
    refused: list[ProcessStep] = []
    for effect in plan.effects:
        match effect:
            case engine.Open():
                step = ProcessStep(
                    instance_id=instance.id,
                    step=effect.step,
                    kind=effect.kind,
                    status="open",
                    role=effect.role,
                    due_at=now + timedelta(seconds=effect.due_in_s) if effect.due_in_s is not None else None,
                    arrivals=0,
                )
                session.add(step)
                if effect.task is not None or effect.child is not None:
                    await session.flush()  # the step's id: its task's idempotency key, the child's parent
                _record(session, instance, "step.opened", effect.step, {"kind": effect.kind, "role": effect.role})
                if effect.task is not None and not await _create_task(deps, session, work, instance, step, effect.task):
                    refused.append(step)
                if effect.child is not None:
                    await _start_child(deps, session, work, instance, step, effect.child)
            case engine.Passed():
                if effect.kind not in _RECORDED_WHEN_ENDED:
                    _record(
                        session, instance, "step.passed", effect.step, {"kind": effect.kind, "outcome": effect.outcome}
                    )
                if effect.kind == "join":
                    for row in await repo.steps_of(session, instance.id, open_only=True):
                        if row.step == effect.step:
                            _end_step(row, "done", now)
            case engine.Arrived():
                await _arrive(session, instance, effect)
            case engine.CancelOpen():
                for row in await repo.steps_of(session, instance.id, open_only=True):
                    if row.step in effect.steps:
                        _end_step(row, None, now, status="canceled")
            case engine.Send():
                session.add(
                    ProcessOutbox(
                        instance_id=instance.id,
                        step=effect.step,
                        channel=effect.channel,
                        recipients=list(effect.to),
                        url=effect.url,
                        subject=effect.subject,
                        body=effect.body,
                    )
                )
                _record(
                    session, instance, "notify.queued", effect.step, {"channel": effect.channel, "to": list(effect.to)}
                )
            case engine.Finish():
                await _finish(deps, session, work, instance, effect.result, effect.reason)
                return
    for step in refused:
        await _end_waiting_step(
            deps, session, work, instance, definition, step, "rejected", {"error": "no such device"}
        )


async def _create_task(
    deps: Deps, session: AsyncSession, work: _Work, instance: ProcessInstance, step: ProcessStep, spec: engine.TaskSpec
) -> bool:
    """The step's task, inserted in this transaction; False if the instance's device cannot take one."""
    if instance.device_id is None:
        return False
    try:
        body = TaskCreate(
            method=spec.method,
            params=spec.params if isinstance(spec.params, dict) else {"value": spec.params},
            timeout_s=spec.timeout_s,
            max_attempts=spec.max_attempts,
        )
        new = tasks.new_task(deps.settings.tasks, instance.device_id, body, idempotency_key=f"process-step:{step.id}")
    except (ValidationError, InvalidInput) as exc:
        log.warning("instance %s step %s: the task is not valid: %s", instance.id, step.step, exc)
        return False
    if not await task_repo.insert_tasks(session, [new]):
        return False
    step.task_id = new.id
    work.tasks.append((new.id, instance.device_id))
    return True


async def _start_child(
    deps: Deps, session: AsyncSession, work: _Work, instance: ProcessInstance, step: ProcessStep, spec: engine.ChildSpec
) -> None:
    child_input = spec.input if isinstance(spec.input, dict) else {"value": spec.input}
    body = InstanceCreate(
        definition=spec.definition, version=spec.version, device_id=instance.device_id, input=child_input
    )
    child = await _start(deps, session, work, body, parent=step)
    step.child_id = child.id


async def _arrive(session: AsyncSession, instance: ProcessInstance, effect: engine.Arrived) -> None:
    waiting = [r for r in await repo.steps_of(session, instance.id, open_only=True) if r.step == effect.step]
    if waiting:
        waiting[0].arrivals = effect.arrivals
    else:
        session.add(
            ProcessStep(instance_id=instance.id, step=effect.step, kind="join", status="open", arrivals=effect.arrivals)
        )
    _record(session, instance, "step.arrived", effect.step, {"arrivals": effect.arrivals})


def _end_step(row: ProcessStep, outcome: str | None, now: datetime, *, status: str = "done") -> None:
    row.status, row.outcome, row.finished_at, row.due_at = status, outcome, now, None


async def _finish(
    deps: Deps, session: AsyncSession, work: _Work, instance: ProcessInstance, result: str, reason: str | None
) -> None:
    now = datetime.now(UTC)
    instance.status = "failed" if result == engine.FAILED else "completed"
    instance.result, instance.finished_at, instance.updated_at = result, now, now
    for row in await repo.steps_of(session, instance.id, open_only=True):
        _end_step(row, None, now, status="canceled")
    _record(session, instance, f"process.{instance.status}", None, {"result": result, "reason": reason})
    await _tell_parent(deps, session, work, instance, result)


async def _tell_parent(deps: Deps, session: AsyncSession, work: _Work, child: ProcessInstance, result: str) -> None:
    if child.parent_id is None or child.parent_step_id is None:
        return
    parent = await repo.lock_instance(session, child.parent_id)
    step = await repo.get_step(session, child.parent_step_id)
    if parent is None or step is None or parent.status != "running" or step.status != "open":
        return
    definition = await _definition_of(session, parent)
    await _end_waiting_step(deps, session, work, parent, definition, step, result, {"child_id": str(child.id)})


async def _definition_of(session: AsyncSession, instance: ProcessInstance) -> Definition:
    if (known := _PARSED.get(instance.definition_id)) is not None:
        return known
    row = await repo.get_definition_by_id(session, instance.definition_id)
    assert row is not None  # a foreign key
    return parsed(row)


async def _end_waiting_step(
    deps: Deps,
    session: AsyncSession,
    work: _Work,
    instance: ProcessInstance,
    definition: Definition,
    step: ProcessStep,
    outcome: str,
    output: dict[str, Any],
    actor: str | None = None,
) -> None:
    """End the open `step` with `outcome` and go on from it (the caller holds the instance's lock)."""
    _end_step(step, outcome, datetime.now(UTC))
    step.actor, step.output = actor, output or None
    _record(
        session,
        instance,
        "step.completed",
        step.step,
        {"kind": step.kind, "outcome": outcome, "actor": actor, "step_id": step.id},
        key=f"step:{step.id}",
    )
    joins = (
        {r.step: r.arrivals for r in await repo.steps_of(session, instance.id, open_only=True) if r.kind == "join"}
        if engine.has_joins(definition)
        else {}
    )
    context = await _context(session, instance, definition)
    plan = engine.complete(definition, context, instance.data, step.step, outcome, output, joins)
    await _apply(deps, session, work, instance, definition, plan)


def _after_commit(deps: Deps, work: _Work) -> None:
    if deps.notifier is not None:
        for task_id, device_id in work.tasks:
            deps.notifier.task_queued(task_id, device_id)


async def advance_step(
    deps: Deps,
    instance_id: uuid.UUID,
    step_id: int,
    outcome_of: Any,
    *,
    principal: Principal | None = None,
    wait_for_lock: bool = True,
) -> bool:
    """End the open step `step_id` of the instance with the outcome `outcome_of(definition, step,
    session)` gives (None: not now) and advance the instance, in one transaction under the
    instance's lock. False if the step was no longer open (ended already: nothing changes) or
    the instance is locked by another process and `wait_for_lock` is off."""
    work = _Work()
    async with deps.sessions() as session:
        instance = await repo.lock_instance(session, instance_id, skip_locked=not wait_for_lock)
        if instance is None:
            return False
        step = await repo.get_step(session, step_id)
        if step is None or step.instance_id != instance_id or step.status != "open" or instance.status != "running":
            return False
        definition = await _definition_of(session, instance)
        decided = await outcome_of(definition, step, session)
        if decided is None:
            return False
        outcome, output = decided
        actor = principal.subject if principal else None
        await _end_waiting_step(deps, session, work, instance, definition, step, outcome, output, actor)
        await session.commit()
    _after_commit(deps, work)
    return True


async def complete_human_step(
    deps: Deps, instance_id: uuid.UUID, step_id: int, outcome: str, output: dict[str, Any], principal: Principal
) -> InstanceDetail:
    """Someone holding the step's role ends it with one of its outcomes."""

    async def human_outcome(
        definition: Definition, step: ProcessStep, _session: AsyncSession
    ) -> tuple[str, dict[str, Any]]:
        declared = definition.steps[step.step]
        if not isinstance(declared, HumanStep):
            raise Conflict(f"step {step.step!r} is not a human step")
        if not holds_role(principal, declared.role):
            raise Forbidden(
                f"completing step {step.step!r} needs the role {declared.role!r} (scope role:{declared.role})"
            )
        if outcome not in declared.outcomes:
            raise InvalidInput(f"outcome {outcome!r} is not one of {declared.outcomes}")
        return outcome, output

    if not await advance_step(deps, instance_id, step_id, human_outcome, principal=principal):
        async with deps.sessions() as session:
            step = await repo.get_step(session, step_id)
        if step is None or step.instance_id != instance_id:
            raise NotFound(f"step {step_id} of instance {instance_id} does not exist")
        raise Conflict(f"step {step_id} is {step.status}, not open (or the instance ended)")
    return await get_instance(deps, instance_id)


async def cancel_instance(deps: Deps, instance_id: uuid.UUID, principal: Principal) -> InstanceDetail:
    async with deps.sessions() as session:
        instance = await repo.lock_instance(session, instance_id)
        if instance is None:
            raise NotFound(f"process instance {instance_id} does not exist")
        if instance.status != "running":
            raise Conflict(f"the instance is already {instance.status}")
        await _cancel(session, instance, principal.subject)
        await session.commit()
    return await get_instance(deps, instance_id)


async def _cancel(session: AsyncSession, instance: ProcessInstance, actor: str) -> None:
    """Cancel the instance and its running sub-process instances (their tasks are left to run)."""
    now = datetime.now(UTC)
    instance.status, instance.result, instance.finished_at, instance.updated_at = "canceled", "canceled", now, now
    for row in await repo.steps_of(session, instance.id, open_only=True):
        _end_step(row, None, now, status="canceled")
        child = await repo.lock_instance(session, row.child_id) if row.child_id is not None else None
        if child is not None and child.status == "running":
            await _cancel(session, child, actor)
    _record(session, instance, "process.canceled", None, {"actor": actor})


async def get_instance(deps: Deps, instance_id: uuid.UUID) -> InstanceDetail:
    async with deps.sessions() as session:
        instance = await repo.get_instance(session, instance_id)
        if instance is None:
            raise NotFound(f"process instance {instance_id} does not exist")
        steps = await repo.steps_of(session, instance_id)
        history = await repo.history_of(session, instance_id)
    return InstanceDetail.model_validate(
        {**InstanceRead.model_validate(instance).model_dump(), "steps": steps, "history": history}
    )


async def list_instances(
    deps: Deps,
    *,
    status: str | None,
    name: str | None,
    device_id: str | None,
    before: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[InstanceRead]:
    async with deps.sessions() as session:
        rows = await repo.list_instances(
            session, status=status, name=name, device_id=device_id, before=before, limit=limit
        )
    return [InstanceRead.model_validate(row) for row in rows]


async def work_list(deps: Deps, principal: Principal, role: str | None, limit: int) -> list[StepRead]:
    """Open human steps of `role`, or of every role the caller holds, oldest first."""
    roles = [role] if role is not None else [r for r in deps.settings.processes.roles if holds_role(principal, r)]
    if role is not None and not holds_role(principal, role):
        raise Forbidden(f"the work list of {role!r} needs the scope role:{role}")
    async with deps.sessions() as session:
        return [StepRead.model_validate(row) for row in await repo.work_list(session, roles, limit)]


# --- periodic jobs ------------------------------------------------------------------------------------


async def advance_finished_tasks(deps: Deps) -> int:
    """Device-task steps whose task reached a final status end with that status as the outcome."""
    async with deps.sessions() as session:
        candidates = await repo.steps_with_final_tasks(session, deps.settings.processes.batch)

    async def task_outcome(_d: Definition, step: ProcessStep, session: AsyncSession) -> tuple[str, dict[str, Any]]:
        assert step.task_id is not None
        status, result, error = await repo.task_outcome(session, step.task_id)
        return status, {"task_id": str(step.task_id), "result": result, "error": error}

    advanced = 0
    for step_id, instance_id in candidates:
        advanced += await advance_step(deps, instance_id, step_id, task_outcome, wait_for_lock=False)
    return advanced


async def fire_due_steps(deps: Deps) -> int:
    """Timers that ran out end `done`; human steps past their deadline end with `on_deadline`."""
    async with deps.sessions() as session:
        candidates = await repo.due_steps(session, deps.settings.processes.batch)

    async def due_outcome(
        definition: Definition, step: ProcessStep, _s: AsyncSession
    ) -> tuple[str, dict[str, Any]] | None:
        if step.due_at is None or step.due_at > datetime.now(UTC):
            return None
        declared = definition.steps[step.step]
        if isinstance(declared, HumanStep) and declared.on_deadline is not None:
            return declared.on_deadline, {"deadline_passed": True}
        return "done", {}

    advanced = 0
    for step_id, instance_id in candidates:
        advanced += await advance_step(deps, instance_id, step_id, due_outcome, wait_for_lock=False)
    return advanced


async def record_notification_outcome(deps: Deps, notification: ProcessOutbox, error: str | None) -> None:
    async with deps.sessions() as session:
        if error is None:
            await repo.mark_sent(session, notification.id)
        else:
            settings = deps.settings.processes
            retry = min(settings.retry_after_s * 2 ** min(notification.attempts, 20), settings.retry_max_s)
            await repo.mark_failed(session, notification.id, error, retry)
        await session.commit()


async def lease_notifications(deps: Deps, limit: int, lease_s: float) -> Sequence[ProcessOutbox]:
    async with deps.sessions() as session:
        rows = await repo.lease_due_notifications(session, limit, lease_s)
        await session.commit()
    return rows


# --- triggers ----------------------------------------------------------------------------------------------


async def create_trigger(deps: Deps, body: TriggerCreate) -> TriggerRead:
    if body.event == "state_match":
        if body.condition is None:
            raise InvalidInput("a state_match trigger needs a `condition`")
        try:
            expressions.compile_expression(body.condition)
        except expressions.ExpressionError as exc:
            raise InvalidInput(str(exc)) from exc
    async with deps.sessions() as session:
        if await repo.get_definition(session, body.definition, None) is None:
            raise InvalidInput(f"unknown process definition {body.definition!r}")
        row = ProcessTrigger(
            id=uuid.uuid4(),
            definition=body.definition,
            event=body.event,
            method=body.method,
            statuses=[s.value for s in body.statuses] if body.statuses else None,
            condition=body.condition,
            input=body.input,
            enabled=True,
        )
        session.add(row)
        await session.commit()
    return TriggerRead.model_validate(row)


async def list_triggers(deps: Deps) -> list[TriggerRead]:
    async with deps.sessions() as session:
        return [TriggerRead.model_validate(row) for row in await repo.list_triggers(session)]


async def run_triggers(deps: Deps, limit: int = 1000) -> int:
    """Start instances for the events since the last run that match a trigger: task final
    statuses and devices going offline (from the event log), reported states matching a
    condition. One process at a time reads (the cursor row is locked); each start has a key
    made of the trigger and the event, so an event starts at most one instance per trigger."""
    started = 0
    async with deps.sessions() as session:
        cursor = await repo.lock_trigger_cursor(session)
        if cursor is None:
            return 0  # another process is reading (the migration made the one row)
        triggers = await repo.enabled_triggers(session)
        now = datetime.now(UTC)
        events = await repo.trigger_events_after(session, cursor.event_id, limit)
        for event in _complete_prefix(events, cursor.event_id, now):
            for trigger in triggers:
                if event.device_id is not None and _event_matches(trigger, event):
                    started += await _start_for(deps, session, trigger, event.device_id, f"{trigger.id}:{event.id}")
            cursor.event_id = event.id
        # States reported up to a moment ago: a report committing now is seen by the next run.
        until = now - timedelta(seconds=1)
        for device_id, state, reported_at in await repo.states_reported_between(
            session, cursor.state_seen_at, until, limit
        ):
            for trigger in triggers:
                if (
                    trigger.event == "state_match"
                    and trigger.condition
                    and expressions.holds(trigger.condition, {"state": state})
                ):
                    key = f"{trigger.id}:{device_id}:{reported_at.isoformat()}"
                    started += await _start_for(deps, session, trigger, device_id, key, once_per_device=True)
            cursor.state_seen_at = reported_at
        await session.commit()
    return started


def _complete_prefix(events: Sequence[repo.LogEvent], after: int, now: datetime) -> list[repo.LogEvent]:
    """The events up to the first gap in the ids that may still fill (see TRIGGER_GAP_WAIT_S)."""
    ready: list[repo.LogEvent] = []
    position = after
    for event in events:
        if event.id != position + 1 and event.created_at > now - timedelta(seconds=TRIGGER_GAP_WAIT_S):
            break
        ready.append(event)
        position = event.id
    return ready


def _event_matches(trigger: ProcessTrigger, event: repo.LogEvent) -> bool:
    if trigger.event == "device_offline":
        return event.kind == "device" and event.name == "offline"
    if trigger.event == "task_final":
        return (
            event.kind == "task"
            and event.name in repo.FINAL
            and (trigger.method is None or trigger.method == event.method)
            and (not trigger.statuses or event.name in trigger.statuses)
        )
    return False


async def _start_for(
    deps: Deps,
    session: AsyncSession,
    trigger: ProcessTrigger,
    device_id: str,
    key: str,
    *,
    once_per_device: bool = False,
) -> int:
    """Start the trigger's process for the device inside the trigger job's transaction, under a
    savepoint: one failing start (a definition gone) leaves the others."""
    start_key = f"trigger:{key}"
    if await repo.instance_by_start_key(session, start_key) is not None:
        return 0
    if once_per_device and await repo.running_instance_exists(session, trigger.definition, device_id):
        return 0
    body = InstanceCreate(definition=trigger.definition, device_id=device_id, input=trigger.input)
    work = _Work()
    try:
        async with session.begin_nested():
            await _start(deps, session, work, body, start_key=start_key, actor=f"trigger:{trigger.id}")
    except (NotFound, IntegrityError) as exc:
        log.warning("trigger %s could not start %r for %s: %s", trigger.id, trigger.definition, device_id, exc)
        return 0
    # Notices only after the job's commit: the re-send job covers a crash before it.
    _after_commit(deps, work)
    return 1
