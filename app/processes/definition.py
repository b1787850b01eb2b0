"""The definition format of a business process: a graph of steps, JSON through the API.

A definition is a named, versioned document (`name` + `version`; a new body under the same name
is the next version). Steps are keyed by id; each step's `next` maps its outcomes to the steps
that follow (`"*"`: any other outcome). Step kinds:

- `device_task`: runs a Swarm Core task on the instance's device; outcome = the task's final status.
- `human`: waits for someone holding `role` to complete it with one of `outcomes`; an optional
  `deadline_s` completes it with `on_deadline` when it passes.
- `decision`: CEL conditions over the instance data and the device's reported state; the first
  that holds gives the outcome, else `otherwise`.
- `notify`: an e-mail or a webhook (delivered from an outbox: never lost); outcome `done`.
- `timer`: waits `wait_s` seconds; outcome `done`.
- `parallel`: starts every step of `branches` at once; `join` waits for `all` or `any` of the
  paths that lead into it; outcome `done`.
- `subprocess`: starts an instance of another definition and waits for it; outcome = the
  child's result (`completed`, `failed`, ...).
- `end`: finishes the instance with `result`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from swarm_device.protocol import FINAL_STATUSES

NAME_PATTERN = r"^[a-z][a-z0-9_.-]{0,63}$"
# The largest value of a PostgreSQL `integer` column (versions, step ids).
PG_INT_MAX = 2**31 - 1
STEP_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
# A recipient is an address or `@group`, a group of the definition's `recipients`.
EMAIL_PATTERN = r"^[^@\s<>,;]+@[^@\s<>,;]+\.[^@\s<>,;]+$"
RECIPIENT_PATTERN = r"^(@[a-z][a-z0-9_-]{0,63}|[^@\s<>,;]+@[^@\s<>,;]+\.[^@\s<>,;]+)$"
ANY_OUTCOME = "*"
TASK_OUTCOMES = tuple(sorted(status.value for status in FINAL_STATUSES))


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(default=None, max_length=200)
    next: dict[str, str] = Field(default_factory=dict, description='Outcome -> next step id ("*": any other).')


class DeviceTaskStep(_Step):
    kind: Literal["device_task"]
    method: str = Field(min_length=1, max_length=128)
    params: dict[str, Any] = Field(default_factory=dict, description="A template: `${data.x}` takes instance data.")
    timeout_s: int | None = Field(default=None, ge=1, le=86400)
    max_attempts: int | None = Field(default=None, ge=1, le=20)


class HumanStep(_Step):
    kind: Literal["human"]
    role: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")
    outcomes: list[str] = Field(default=["done"], min_length=1)
    instructions: str | None = Field(default=None, max_length=4000)
    deadline_s: int | None = Field(default=None, ge=1, le=10 * 365 * 86400)
    on_deadline: str | None = Field(default=None, description="The outcome when the deadline passes.")


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    when: str = Field(min_length=1, max_length=2000, description="A CEL expression over `data` and `state`.")
    outcome: str


class DecisionStep(_Step):
    kind: Literal["decision"]
    conditions: list[Condition] = Field(min_length=1)
    otherwise: str


class NotifyStep(_Step):
    kind: Literal["notify"]
    channel: Literal["email", "webhook"]
    to: list[Annotated[str, Field(pattern=RECIPIENT_PATTERN)]] = Field(default_factory=list)
    url: str | None = Field(default=None, pattern=r"^https?://", max_length=2000)
    subject: str = Field(default="", max_length=500, description="A template, like the body.")
    body: str = Field(default="", max_length=20000)


class TimerStep(_Step):
    kind: Literal["timer"]
    wait_s: float = Field(ge=0, le=10 * 365 * 86400)


class ParallelStep(_Step):
    kind: Literal["parallel"]
    branches: list[str] = Field(min_length=2)


class JoinStep(_Step):
    kind: Literal["join"]
    wait_for: Literal["all", "any"] = "all"


class SubprocessStep(_Step):
    kind: Literal["subprocess"]
    definition: str = Field(pattern=NAME_PATTERN)
    version: int | None = Field(
        default=None, ge=1, le=PG_INT_MAX, description="Default: the newest when the step starts."
    )
    input: dict[str, Any] = Field(default_factory=dict, description="A template over the instance data.")


class EndStep(_Step):
    kind: Literal["end"]
    result: str = "completed"


Step = Annotated[
    DeviceTaskStep
    | HumanStep
    | DecisionStep
    | NotifyStep
    | TimerStep
    | ParallelStep
    | JoinStep
    | SubprocessStep
    | EndStep,
    Field(discriminator="kind"),
]
# Steps that wait for something outside the instance; every other kind passes at once.
WAITING_KINDS = frozenset({"device_task", "human", "timer", "join", "subprocess"})


class Definition(BaseModel):
    """The body of a process definition (`name` and `version` are kept beside it)."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(default=None, max_length=200)
    description: str | None = Field(default=None, max_length=4000)
    start: str = Field(pattern=STEP_PATTERN)
    steps: dict[Annotated[str, Field(pattern=STEP_PATTERN)], Step] = Field(min_length=1)
    recipients: dict[
        Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")],
        list[Annotated[str, Field(pattern=EMAIL_PATTERN, max_length=320)]],
    ] = Field(default_factory=dict, description="Named groups of e-mail addresses, used as `@group` in `to`.")


def possible_outcomes(step: Step) -> tuple[str, ...]:
    """Every outcome a step can end with (an empty tuple for `end`)."""
    match step:
        case DeviceTaskStep():
            return TASK_OUTCOMES
        case HumanStep():
            return tuple(step.outcomes)
        case DecisionStep():
            return tuple(dict.fromkeys([*(c.outcome for c in step.conditions), step.otherwise]))
        case SubprocessStep():
            return ("completed", "failed", "canceled")
        case EndStep() | ParallelStep():
            return ()
        case _:
            return ("done",)


def successors(step: Step) -> list[str]:
    """The steps that may follow `step`."""
    branches = step.branches if isinstance(step, ParallelStep) else []
    return [*branches, *step.next.values()]
