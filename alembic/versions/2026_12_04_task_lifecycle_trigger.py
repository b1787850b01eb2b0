"""the task lifecycle in the database: allowed changes of status, and the version of every change

Revision ID: 5c1f0a9d7e52
Revises: c4f1a9d7e3b2
Create Date: 2026-12-04 17:00:00.000000

`tasks_lifecycle` refuses a change of status that app/tasks/lifecycle.py's table does not allow,
and gives every change the audit records (status, attempt, deadline, details, result, error) the
next version, so that no statement has to write `version = version + 1` (the audit trigger writes
an event for each new version). It runs after `tasks_guard_final` (triggers fire by name), so a
change of a final task is refused as before. Statements that change only the outbox
(`notice_due_at`) or the priority call no PL/pgSQL.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "5c1f0a9d7e52"
down_revision: str | None = "c4f1a9d7e3b2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# app/tasks/lifecycle.py's TRANSITIONS as "source>target" (tests/e2e/test_lifecycle_table.py
# checks that the database allows exactly those).
ALLOWED = (
    "queued>sent",
    "queued>in_progress",
    "sent>in_progress",
    "in_progress>succeeded",
    "in_progress>failed",
    "in_progress>rejected",
    "in_progress>queued",
    "in_progress>timed_out",
    "queued>expired",
    "sent>expired",
    "queued>canceled",
    "sent>canceled",
    "in_progress>canceled",
)

LIFECYCLE = f"""
CREATE FUNCTION tasks_lifecycle() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status <> OLD.status
       AND OLD.status || '>' || NEW.status <> ALL ('{{{",".join(ALLOWED)}}}'::text[]) THEN
        RAISE check_violation USING MESSAGE = format('task %s cannot go from %s to %s', OLD.id, OLD.status, NEW.status),
            TABLE = 'tasks';
    END IF;
    NEW.version := OLD.version + 1;
    RETURN NEW;
END $$
"""

CHANGED = (
    "(NEW.status, NEW.attempt, NEW.deadline_at, NEW.status_details, NEW.result, NEW.error) "
    "IS DISTINCT FROM (OLD.status, OLD.attempt, OLD.deadline_at, OLD.status_details, OLD.result, OLD.error)"
)


def upgrade() -> None:
    op.execute(LIFECYCLE)
    op.execute(
        f"CREATE TRIGGER tasks_lifecycle BEFORE UPDATE ON tasks FOR EACH ROW WHEN ({CHANGED}) "
        "EXECUTE FUNCTION tasks_lifecycle()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER tasks_lifecycle ON tasks")
    op.execute("DROP FUNCTION tasks_lifecycle()")
