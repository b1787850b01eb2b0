"""The task lifecycle: which status may follow which, and why. The one table every change of a
task's status is checked against.

The database holds the same table (trigger `tasks_lifecycle`, migration 5c1f0a9d7e52): it refuses
any other change of status, whatever code path tries, and gives every change a new `version`, which
the audit trigger turns into a task event. The repository's statements pick the rows they change
with `sources(...)`, so a statement moves tasks only along rows of this table.
tests/e2e/test_lifecycle_table.py checks that the database allows exactly these changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from app import metrics
from app.tasks.models import Task
from swarm_device.protocol import TaskStatus

QUEUED, SENT, IN_PROGRESS = TaskStatus.QUEUED, TaskStatus.SENT, TaskStatus.IN_PROGRESS
SUCCEEDED, FAILED, REJECTED = TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.REJECTED
TIMED_OUT, EXPIRED, CANCELED = TaskStatus.TIMED_OUT, TaskStatus.EXPIRED, TaskStatus.CANCELED


class Event(StrEnum):
    """What moves a task from one status to another."""

    NOTICE_CONFIRMED = "notice_confirmed"  # the broker confirmed the task's notice to the device
    PULLED = "pulled"  # the device took it with tasks/next
    REPORTED = "reported"  # the device reported its result
    RETRIED = "retried"  # its deadline passed and attempts remain
    TIMED_OUT = "timed_out"  # its deadline passed on the last attempt
    EXPIRED = "expired"  # its `expires_at` passed before a device took it
    CANCELED = "canceled"  # POST /tasks/{id}/cancel, or its device was revoked


@dataclass(frozen=True, slots=True)
class Transition:
    source: TaskStatus
    target: TaskStatus
    event: Event


# Every task starts here (the column's default), at version 1.
CREATED = QUEUED

# A progress report keeps a task IN_PROGRESS: a new version, no new status.
TRANSITIONS: tuple[Transition, ...] = (
    Transition(QUEUED, SENT, Event.NOTICE_CONFIRMED),
    Transition(QUEUED, IN_PROGRESS, Event.PULLED),
    Transition(SENT, IN_PROGRESS, Event.PULLED),
    Transition(IN_PROGRESS, SUCCEEDED, Event.REPORTED),
    Transition(IN_PROGRESS, FAILED, Event.REPORTED),
    Transition(IN_PROGRESS, REJECTED, Event.REPORTED),
    Transition(IN_PROGRESS, QUEUED, Event.RETRIED),
    Transition(IN_PROGRESS, TIMED_OUT, Event.TIMED_OUT),
    Transition(QUEUED, EXPIRED, Event.EXPIRED),
    Transition(SENT, EXPIRED, Event.EXPIRED),
    Transition(QUEUED, CANCELED, Event.CANCELED),
    Transition(SENT, CANCELED, Event.CANCELED),
    Transition(IN_PROGRESS, CANCELED, Event.CANCELED),
)

ALLOWED = frozenset((t.source, t.target) for t in TRANSITIONS)


class TransitionRefused(ValueError):
    """A change of status that the table does not allow: a bug in the caller, not bad input."""


def sources(event: Event) -> list[str]:
    """The statuses (as stored) from which `event` moves a task, in the table's order."""
    return list(dict.fromkeys(t.source.value for t in TRANSITIONS if t.event is event))


def target(source: TaskStatus, event: Event) -> TaskStatus:
    """Where `event` takes a task in `source`; only for events with one target per source."""
    targets = [t.target for t in TRANSITIONS if t.source is source and t.event is event]
    if len(targets) != 1:
        raise TransitionRefused(f"{event} from {source} leads to {len(targets)} statuses")
    return targets[0]


def check(source: TaskStatus, new: TaskStatus) -> None:
    if (source, new) not in ALLOWED:
        raise TransitionRefused(f"a task cannot go from {source} to {new}")


def change(task: Task, new: TaskStatus, **changes: Any) -> None:
    """Change a loaded (locked) task's status, with `changes` to other columns, written at the
    next flush. A final status also ends the deadline and the pending notice."""
    check(TaskStatus(task.status), new)
    now = datetime.now(UTC)
    task.status = new
    # The trigger sets the same version in the database; kept here so the loaded task shows it.
    task.version += 1
    task.updated_at = now
    if new.is_final:
        task.finished_at = now
        task.deadline_at = None
        task.notice_due_at = None
        metrics.CREATED_TO_FINAL.labels(new.value).observe(metrics.seconds_between(task.created_at, now))
    for name, value in changes.items():
        setattr(task, name, value)
