"""task events of an INSERT per statement; the audit and guard row triggers skip rows with nothing to do

Revision ID: 7a0c0e1d2b03
Revises: 7a0c0e1d2b02
Create Date: 2026-11-25 19:40:00.000000

The row trigger ran a PL/pgSQL call and a one-row INSERT for every task of a 1,000-task batch
(over half of the batch INSERT). An INSERT now writes its events with one INSERT ... SELECT from
its transition table: the same rows (same values, ids in the order the tasks were inserted).
UPDATEs keep the row trigger: a statement trigger costs a
one-row UPDATE (a claim, a result: the device's hot path) about half again as much, and its join
of the old and new rows would keep the plan made for the first statement of a connection (a
nested loop for one row: ten times slower for 1,000). Instead the row triggers get WHEN
conditions, equal to the tests in their functions, so that the PL/pgSQL call is made only for a
row that writes an event or must be refused.
"""

from collections.abc import Sequence

from alembic import op

revision: str = '7a0c0e1d2b03'
down_revision: str | None = '7a0c0e1d2b02'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FINAL = "('succeeded', 'failed', 'rejected', 'timed_out', 'expired', 'canceled')"

# The transition table is read in the order the tasks were inserted, the order in which the row
# trigger wrote their events.
RECORD_INSERTED = (
    """
CREATE FUNCTION tasks_record_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO task_events (task_id, version, status, attempt, details)
    SELECT n.id, n.version, n.status, n.attempt, NULLIF(jsonb_strip_nulls(jsonb_build_object(
        'status_details', n.status_details, 'result', n.result, 'error', n.error)), '{}'::jsonb)
    FROM inserted_tasks n;
    RETURN NULL;
END $$
""",
    "CREATE TRIGGER tasks_record_inserted AFTER INSERT ON tasks REFERENCING NEW TABLE AS inserted_tasks "
    "FOR EACH STATEMENT EXECUTE FUNCTION tasks_record_inserted()",
)

# The conditions under which tasks_record_event() and tasks_guard_final() act on an UPDATE.
RECORDS_UPDATE = "NEW.version <> OLD.version"
GUARDS_UPDATE = f"OLD.status IN {FINAL} AND NEW IS DISTINCT FROM OLD"


def _row_trigger(name: str, timing: str, when: str = "") -> str:
    condition = f"WHEN ({when}) " if when else ""
    return f"CREATE TRIGGER {name} {timing} ON tasks FOR EACH ROW {condition}EXECUTE FUNCTION {name}()"


# The foreign-key checks of the event rows run inside these functions. Planned once per
# connection while `tasks` was small (a new database), they would stay sequential scans as the
# table grows, until autovacuum's next ANALYZE: 0.9-3.2 s for one batch's 1,000 events instead of
# 20 ms (auto_explain). Planning them for each execution costs microseconds.
PLANNED_PER_EXECUTION = ("tasks_record_inserted", "tasks_record_event")


def upgrade() -> None:
    for statement in RECORD_INSERTED:
        op.execute(statement)
    for function in PLANNED_PER_EXECUTION:
        op.execute(f"ALTER FUNCTION {function}() SET plan_cache_mode = force_custom_plan")
    op.execute("DROP TRIGGER tasks_record_event ON tasks")
    op.execute(_row_trigger("tasks_record_event", "AFTER UPDATE", RECORDS_UPDATE))
    op.execute("DROP TRIGGER tasks_guard_final ON tasks")
    op.execute(_row_trigger("tasks_guard_final", "BEFORE UPDATE", GUARDS_UPDATE))


def downgrade() -> None:
    op.execute("ALTER FUNCTION tasks_record_event() RESET plan_cache_mode")
    op.execute("DROP TRIGGER tasks_guard_final ON tasks")
    op.execute(_row_trigger("tasks_guard_final", "BEFORE UPDATE"))
    op.execute("DROP TRIGGER tasks_record_event ON tasks")
    op.execute(_row_trigger("tasks_record_event", "AFTER INSERT OR UPDATE"))
    op.execute("DROP TRIGGER tasks_record_inserted ON tasks")
    op.execute("DROP FUNCTION tasks_record_inserted()")
