"""The process state machine as pure functions: validation of a definition, and what happens
when an instance starts or one of its waiting steps ends. No I/O: the service applies the
returned effects in one transaction.

Instance data is `{"input": {...}, "steps": {step id: {"outcome": ..., ...}}}`. Conditions and
templates see `input`, `steps`, `state` (the device's reported state), `device_id` and
`instance_id`. A template string `"${input.x}"` is replaced by the value (any JSON type); inside
longer text each `${path}` is replaced by the value as text.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.processes import expressions
from app.processes.definition import (
    ANY_OUTCOME,
    DecisionStep,
    Definition,
    DeviceTaskStep,
    EndStep,
    HumanStep,
    JoinStep,
    NotifyStep,
    ParallelStep,
    Step,
    SubprocessStep,
    TimerStep,
    possible_outcomes,
    successors,
)

# Steps taken without waiting in one advance; more means a loop of automatic steps.
MAX_AUTOMATIC_STEPS = 1000
FAILED = "failed"
_ANY_PASSED = -1

_WHOLE = re.compile(r"^\$\{([A-Za-z0-9_.-]+)\}$")
_PART = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")


# --- validation ---------------------------------------------------------------------------------


def problems(
    name: str, definition: Definition, known_roles: Iterable[str], known_definitions: Iterable[str]
) -> list[str]:
    """Every reason why `definition` cannot run (empty: it can)."""
    roles, others = frozenset(known_roles), frozenset(known_definitions)
    steps = definition.steps
    found: list[str] = []
    if definition.start not in steps:
        found.append(f"start: step {definition.start!r} does not exist")
    for step_id, step in steps.items():
        found.extend(
            f"step {step_id!r}: {problem}" for problem in _step_problems(name, definition, step, roles, others)
        )
    for join_id, count in _arrivals(definition).items():
        if count < 2:
            found.append(f"step {join_id!r}: a join needs at least two parallel branches leading to it, has {count}")
    if definition.start in steps:
        reachable = _reachable(definition, [definition.start], forward=True)
        found.extend(f"step {s!r}: unreachable from the start" for s in steps if s not in reachable)
        ends = [s for s, step in steps.items() if isinstance(step, EndStep)]
        if not ends:
            found.append("no end step: the process can never finish")
        finishing = _reachable(definition, ends, forward=False)
        found.extend(
            f"step {s!r}: no way out (no path from it reaches an end step)"
            for s in steps
            if s in reachable and s not in finishing
        )
    return found


def _step_problems(
    name: str, definition: Definition, step: Step, roles: frozenset[str], others: frozenset[str]
) -> Iterable[str]:
    outcomes = possible_outcomes(step)
    for outcome in outcomes:
        if outcome not in step.next and ANY_OUTCOME not in step.next:
            yield f"outcome {outcome!r} leads nowhere (no `next` for it)"
    for outcome, target in step.next.items():
        if outcome != ANY_OUTCOME and outcome not in outcomes:
            yield f"`next` names outcome {outcome!r}, which this step never has (it has {list(outcomes)})"
        if target not in definition.steps:
            yield f"outcome {outcome!r} leads to unknown step {target!r}"
    match step:
        case HumanStep():
            if step.role not in roles:
                yield f"unknown role {step.role!r} (known: {sorted(roles)})"
            if (step.deadline_s is None) != (step.on_deadline is None):
                yield "`deadline_s` and `on_deadline` go together"
            if step.on_deadline is not None and step.on_deadline not in step.outcomes:
                yield f"`on_deadline` {step.on_deadline!r} is not one of its outcomes"
        case DecisionStep():
            for condition in step.conditions:
                try:
                    expressions.compile_expression(condition.when)
                except expressions.ExpressionError as exc:
                    yield str(exc)
        case NotifyStep():
            if step.channel == "email" and not step.to:
                yield "an e-mail needs recipients (`to`)"
            if step.channel == "webhook" and step.url is None:
                yield "a webhook needs a `url`"
            for recipient in step.to:
                if recipient.startswith("@") and recipient[1:] not in definition.recipients:
                    yield f"unknown recipient group {recipient!r}"
        case ParallelStep():
            yield from (f"branch {b!r} is an unknown step" for b in step.branches if b not in definition.steps)
            if step.next:
                yield "a parallel step goes on through its `branches`, not `next`"
        case SubprocessStep():
            if step.definition == name:
                yield "a process cannot call itself"
            elif step.definition not in others:
                yield f"unknown process definition {step.definition!r}"
        case EndStep():
            if step.next:
                yield "an end step has no `next`"


def _reachable(
    definition: Definition, roots: list[str], *, forward: bool, through: frozenset[str] = frozenset()
) -> set[str]:
    """Steps reachable from `roots` (against the arrows unless `forward`), not going on past
    the steps in `through`."""
    edges: dict[str, list[str]] = {s: [] for s in definition.steps}
    for step_id, step in definition.steps.items():
        if step_id in through:
            continue
        for target in successors(step):
            if target in edges:
                if forward:
                    edges[step_id].append(target)
                else:
                    edges[target].append(step_id)
    seen = set(roots)
    queue = deque(roots)
    while queue:
        for target in edges.get(queue.popleft(), []):
            if target not in seen:
                seen.add(target)
                queue.append(target)
    return seen


def _arrivals(definition: Definition) -> dict[str, int]:
    """Per join step, how many paths arrive at it (what `all` waits for): the branches of
    parallel steps from which it is reached without passing another join."""
    joins = frozenset(s for s, step in definition.steps.items() if isinstance(step, JoinStep))
    counts = dict.fromkeys(joins, 0)
    for step in definition.steps.values():
        if isinstance(step, ParallelStep):
            for branch in step.branches:
                for join in joins & _reachable(definition, [branch], forward=True, through=joins):
                    counts[join] += 1
    return counts


def feeders(definition: Definition, join_id: str) -> frozenset[str]:
    """The steps with a path to `join_id` (those an `any` join cancels when it passes)."""
    return frozenset(_reachable(definition, [join_id], forward=False) - {join_id})


def reads_state(definition: Definition) -> bool:
    """Whether a step may look at the device's reported state (conditions, templates)."""
    return any(
        isinstance(s, DecisionStep | NotifyStep | DeviceTaskStep | SubprocessStep) for s in definition.steps.values()
    )


def has_joins(definition: Definition) -> bool:
    return any(isinstance(s, JoinStep) for s in definition.steps.values())


# --- templates ----------------------------------------------------------------------------------


def lookup(scope: Mapping[str, Any], path: str) -> Any:
    value: Any = scope
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def render(template: Any, scope: Mapping[str, Any]) -> Any:
    """`template` with every `${path}` replaced from `scope` (dicts and lists walked)."""
    if isinstance(template, str):
        if whole := _WHOLE.match(template):
            return lookup(scope, whole.group(1))
        return _PART.sub(lambda m: _as_text(lookup(scope, m.group(1))), template)
    if isinstance(template, dict):
        return {key: render(value, scope) for key, value in template.items()}
    if isinstance(template, list):
        return [render(value, scope) for value in template]
    return template


def _as_text(value: Any) -> str:
    return "" if value is None else str(value)


# --- transitions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What conditions and templates see besides the instance data."""

    instance_id: str
    device_id: str | None
    state: Mapping[str, Any]


@dataclass(frozen=True)
class TaskSpec:
    method: str
    params: Any
    timeout_s: int | None
    max_attempts: int | None


@dataclass(frozen=True)
class ChildSpec:
    definition: str
    version: int | None
    input: Any


@dataclass(frozen=True)
class Open:
    """A waiting step starts: the service writes its row (and its task, timer or child)."""

    step: str
    kind: str
    role: str | None = None
    due_in_s: float | None = None
    task: TaskSpec | None = None
    child: ChildSpec | None = None


@dataclass(frozen=True)
class Passed:
    """A step ended with `outcome` (history)."""

    step: str
    kind: str
    outcome: str


@dataclass(frozen=True)
class Arrived:
    """A path reached a join that still waits for others; `arrivals` so far."""

    step: str
    arrivals: int


@dataclass(frozen=True)
class CancelOpen:
    """Open steps among `steps` end without an outcome (an `any` join passed)."""

    steps: frozenset[str]


@dataclass(frozen=True)
class Send:
    """A notification to deliver (through the outbox)."""

    step: str
    channel: str
    to: tuple[str, ...]
    url: str | None
    subject: str
    body: str


@dataclass(frozen=True)
class Finish:
    result: str
    reason: str | None = None


Effect = Open | Passed | Arrived | CancelOpen | Send | Finish


@dataclass
class Plan:
    """The effects of one advance, in order, and the instance data after it."""

    data: dict[str, Any]
    effects: list[Effect] = field(default_factory=list)

    @property
    def finished(self) -> Finish | None:
        return next((e for e in self.effects if isinstance(e, Finish)), None)


def start(definition: Definition, context: Context, data: dict[str, Any]) -> Plan:
    """The effects of starting an instance with `data` (its `input` set)."""
    plan = Plan(data={"input": data.get("input", {}), "steps": dict(data.get("steps", {}))})
    _walk(definition, context, plan, [definition.start], {})
    return plan


def complete(
    definition: Definition,
    context: Context,
    data: dict[str, Any],
    step_id: str,
    outcome: str,
    output: Mapping[str, Any] | None = None,
    joins: Mapping[str, int] | None = None,
) -> Plan:
    """The effects of the waiting step `step_id` ending with `outcome` (and `output`, kept in
    the data as `steps.<id>`). `joins`: arrivals so far at each join that waits."""
    plan = Plan(data={"input": data.get("input", {}), "steps": dict(data.get("steps", {}))})
    step = definition.steps[step_id]
    plan.data["steps"][step_id] = {**(output or {}), "outcome": outcome}
    plan.effects.append(Passed(step_id, step.kind, outcome))
    _walk(definition, context, plan, _follow(step_id, step, outcome, plan), dict(joins or {}))
    return plan


def _follow(step_id: str, step: Step, outcome: str, plan: Plan) -> list[str]:
    target = step.next.get(outcome, step.next.get(ANY_OUTCOME))
    if target is None:
        plan.effects.append(Finish(FAILED, f"step {step_id!r}: outcome {outcome!r} leads nowhere"))
        return []
    return [target]


def _walk(definition: Definition, context: Context, plan: Plan, entering: list[str], joins: dict[str, int]) -> None:
    queue = deque(entering)
    taken = 0
    while queue and plan.finished is None:
        taken += 1
        if taken > MAX_AUTOMATIC_STEPS:
            plan.effects.append(Finish(FAILED, f"more than {MAX_AUTOMATIC_STEPS} steps without waiting (a loop)"))
            return
        step_id = queue.popleft()
        queue.extend(_enter(definition, context, plan, step_id, joins))


def _scope(context: Context, data: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "input": data["input"],
        "steps": data["steps"],
        "state": dict(context.state),
        "device_id": context.device_id,
        "instance_id": context.instance_id,
    }


def _enter(definition: Definition, context: Context, plan: Plan, step_id: str, joins: dict[str, int]) -> list[str]:
    """Start `step_id`: the steps to enter next (none if it waits)."""
    step = definition.steps[step_id]
    match step:
        case DeviceTaskStep():
            params = render(step.params, _scope(context, plan.data))
            plan.effects.append(
                Open(step_id, step.kind, task=TaskSpec(step.method, params, step.timeout_s, step.max_attempts))
            )
        case HumanStep():
            plan.effects.append(Open(step_id, step.kind, role=step.role, due_in_s=step.deadline_s))
        case TimerStep():
            plan.effects.append(Open(step_id, step.kind, due_in_s=step.wait_s))
        case SubprocessStep():
            child_input = render(step.input, _scope(context, plan.data))
            plan.effects.append(Open(step_id, step.kind, child=ChildSpec(step.definition, step.version, child_input)))
        case DecisionStep():
            scope = _scope(context, plan.data)
            outcome = next((c.outcome for c in step.conditions if expressions.holds(c.when, scope)), step.otherwise)
            return _pass(step_id, step, outcome, plan)
        case NotifyStep():
            scope = _scope(context, plan.data)
            recipients = _recipients(definition, step.to)
            subject, body = render(step.subject, scope), render(step.body, scope)
            plan.effects.append(Send(step_id, step.channel, recipients, step.url, str(subject), str(body)))
            return _pass(step_id, step, "done", plan)
        case ParallelStep():
            plan.effects.append(Passed(step_id, step.kind, "split"))
            return list(step.branches)
        case JoinStep():
            if joins.get(step_id) == _ANY_PASSED:
                return []  # a later path of an `any` join that passed in this same advance
            arrivals = joins.get(step_id, 0) + 1
            if step.wait_for == "all" and arrivals < _arrivals(definition)[step_id]:
                joins[step_id] = arrivals
                plan.effects.append(Arrived(step_id, arrivals))
                return []
            joins.pop(step_id, None)
            if step.wait_for == "any":
                joins[step_id] = _ANY_PASSED
                plan.effects.append(CancelOpen(feeders(definition, step_id)))
            return _pass(step_id, step, "done", plan)
        case EndStep():
            plan.effects.append(Passed(step_id, step.kind, step.result))
            plan.effects.append(Finish(step.result))
    return []


def _pass(step_id: str, step: Step, outcome: str, plan: Plan) -> list[str]:
    plan.data["steps"][step_id] = {"outcome": outcome}
    plan.effects.append(Passed(step_id, step.kind, outcome))
    return _follow(step_id, step, outcome, plan)


def _recipients(definition: Definition, to: list[str]) -> tuple[str, ...]:
    addresses: list[str] = []
    for recipient in to:
        addresses.extend(definition.recipients.get(recipient[1:], []) if recipient.startswith("@") else [recipient])
    return tuple(dict.fromkeys(addresses))
