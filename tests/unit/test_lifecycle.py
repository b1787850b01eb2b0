"""The lifecycle table as pure logic: its shape, the look-ups the repository builds its statements
from, and the change of a loaded task (tests/e2e/test_lifecycle_table.py: the database's copy)."""

from __future__ import annotations

import importlib.util
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from app.tasks import lifecycle
from app.tasks.lifecycle import ALLOWED, TRANSITIONS, Event, TransitionRefused
from app.tasks.models import Task
from swarm_device.protocol import FINAL_STATUSES, PENDING_STATUSES, TaskStatus
from tests.conftest import ROOT


def reachable_from(start: TaskStatus) -> set[TaskStatus]:
    seen = {start}
    frontier = [start]
    while frontier:
        source = frontier.pop()
        for t in TRANSITIONS:
            if t.source is source and t.target not in seen:
                seen.add(t.target)
                frontier.append(t.target)
    return seen


def test_every_status_is_reachable_from_queued_and_final_ones_lead_nowhere() -> None:
    assert reachable_from(TaskStatus.QUEUED) == set(TaskStatus)
    assert not [t for t in TRANSITIONS if t.source.is_final]
    # Every non-final status can still end: nothing is stuck.
    for status in set(TaskStatus) - FINAL_STATUSES:
        assert reachable_from(status) & FINAL_STATUSES, status


def test_a_new_task_starts_where_the_table_says() -> None:
    assert Task.__table__.c.status.server_default.arg == lifecycle.CREATED.value
    assert lifecycle.CREATED is TaskStatus.QUEUED


def test_each_change_of_status_is_listed_once_and_none_stays_in_place() -> None:
    pairs = [(t.source, t.target) for t in TRANSITIONS]
    assert len(pairs) == len(set(pairs)) == len(ALLOWED)
    assert all(source is not target for source, target in pairs)


def test_the_statements_select_their_rows_from_the_table() -> None:
    assert set(lifecycle.sources(Event.PULLED)) == {s.value for s in PENDING_STATUSES}
    assert set(lifecycle.sources(Event.EXPIRED)) == {s.value for s in PENDING_STATUSES}
    assert lifecycle.sources(Event.REPORTED) == [TaskStatus.IN_PROGRESS.value]
    assert lifecycle.sources(Event.RETRIED) == [TaskStatus.IN_PROGRESS.value]
    assert set(lifecycle.sources(Event.CANCELED)) == {"queued", "sent", "in_progress"}
    assert lifecycle.target(TaskStatus.QUEUED, Event.NOTICE_CONFIRMED) is TaskStatus.SENT
    with pytest.raises(TransitionRefused):
        lifecycle.target(TaskStatus.IN_PROGRESS, Event.REPORTED)  # three results
    with pytest.raises(TransitionRefused):
        lifecycle.target(TaskStatus.SENT, Event.NOTICE_CONFIRMED)  # none


def test_the_database_trigger_allows_the_same_changes() -> None:
    """The migration that made the trigger holds its own copy (migrations never import the app):
    a change of the table needs a new migration."""
    path = ROOT / "alembic" / "versions" / "2026_12_04_task_lifecycle_trigger.py"
    spec = importlib.util.spec_from_file_location("lifecycle_migration", path)
    assert spec is not None
    assert spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    assert set(migration.ALLOWED) == {f"{source}>{target}" for source, target in ALLOWED}


def loaded_task(status: TaskStatus) -> Task:
    now = datetime.now(UTC)
    return Task(
        id=uuid.uuid4(),
        device_id="dev-1",
        status=status.value,
        version=3,
        created_at=now - timedelta(seconds=1),
        updated_at=now - timedelta(seconds=1),
        deadline_at=now + timedelta(seconds=30),
        notice_due_at=now,
    )


def test_a_change_to_a_final_status_ends_the_deadline_and_the_notice() -> None:
    task = loaded_task(TaskStatus.IN_PROGRESS)
    lifecycle.change(task, TaskStatus.FAILED, error={"message": "disk full"})
    assert (task.status, task.version, task.deadline_at, task.notice_due_at) == ("failed", 4, None, None)
    assert task.finished_at is not None
    assert task.finished_at == task.updated_at
    assert task.error == {"message": "disk full"}


def test_a_change_back_to_queued_keeps_what_the_caller_sets() -> None:
    task = loaded_task(TaskStatus.IN_PROGRESS)
    due = datetime.now(UTC)
    lifecycle.change(task, TaskStatus.QUEUED, deadline_at=None, notice_due_at=due)
    assert (task.status, task.version, task.deadline_at, task.notice_due_at, task.finished_at) == (
        "queued",
        4,
        None,
        due,
        None,
    )


REFUSED = [
    (TaskStatus.QUEUED, TaskStatus.SUCCEEDED),
    (TaskStatus.SENT, TaskStatus.QUEUED),
    (TaskStatus.FAILED, TaskStatus.CANCELED),
]


@pytest.mark.parametrize(("source", "target"), REFUSED)
def test_a_refused_change_raises_and_changes_nothing(source: TaskStatus, target: TaskStatus) -> None:
    task = loaded_task(source)
    with pytest.raises(TransitionRefused, match=f"from {source} to {target}"):
        lifecycle.change(task, target)
    assert (task.status, task.version) == (source.value, 3)
