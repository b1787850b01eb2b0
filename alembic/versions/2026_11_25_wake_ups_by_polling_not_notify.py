"""wake-ups by polling: no pg_notify in any trigger (the audit and event-log triggers stay)

NOTIFY takes a database-wide lock from the NOTIFY until the end of the commit (its fsync
included), so every commit that wrote a task or device event ran one at a time. The app now
polls for commits instead (app/events/feed.py); see docs/decisions.md.

Revision ID: 7a0c0e1d2b01
Revises: 0fe196a2d66f
Create Date: 2026-11-25 18:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = '7a0c0e1d2b01'
down_revision: str | None = '0fe196a2d66f'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FINAL = "('succeeded', 'failed', 'rejected', 'timed_out', 'expired', 'canceled')"


def _record_task_event(notify_final: str) -> str:
    # The audit row for every version bump, as in the first migration.
    return f"""
CREATE OR REPLACE FUNCTION tasks_record_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.version <> OLD.version THEN
        INSERT INTO task_events (task_id, version, status, attempt, details)
        VALUES (NEW.id, NEW.version, NEW.status, NEW.attempt, NULLIF(jsonb_strip_nulls(jsonb_build_object(
            'status_details', NEW.status_details, 'result', NEW.result, 'error', NEW.error)), '{{}}'::jsonb));
    END IF;{notify_final}
    RETURN NULL;
END $$
"""


NOTIFY_FINAL = f"""
    IF NEW.status IN {FINAL}
       AND (TG_OP = 'INSERT' OR OLD.status <> NEW.status) THEN
        PERFORM pg_notify('swarm_task_final', NEW.id::text);
    END IF;"""

# What 128f262ad165 created, restored by the downgrade.
NOTIFY_EVENTS = (
    """
CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('swarm_events', '');
    RETURN NULL;
END $$
""",
    "CREATE TRIGGER task_events_notify AFTER INSERT ON task_events FOR EACH STATEMENT EXECUTE FUNCTION events_notify()",
    "CREATE TRIGGER device_events_notify AFTER INSERT ON device_events FOR EACH STATEMENT "
    "EXECUTE FUNCTION events_notify()",
)


def upgrade() -> None:
    # asyncpg runs one statement per call.
    op.execute("DROP TRIGGER device_events_notify ON device_events")
    op.execute("DROP TRIGGER task_events_notify ON task_events")
    op.execute("DROP FUNCTION events_notify()")
    op.execute(_record_task_event(""))


def downgrade() -> None:
    op.execute(_record_task_event(NOTIFY_FINAL))
    for statement in NOTIFY_EVENTS:
        op.execute(statement)
