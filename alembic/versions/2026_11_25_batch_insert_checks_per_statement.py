"""a task's device and batch checked once per INSERT statement; FK check plans of the audit triggers kept

Revision ID: b3a7c1e0d204
Revises: 7a0c0e1d2b03
Create Date: 2026-11-25 22:30:00.000000

Of a 1,000-task batch INSERT (~60 ms), the two foreign keys of `tasks` took ~22 ms (a check with a
row lock per task, 1,000 times on the same batch row) and the re-planned foreign-key checks of the
event rows ~11 ms (docs/performance.md; decision 23).

- `tasks.device_id` and `tasks.batch_id` lose their foreign keys. Instead one statement trigger
  per INSERT refuses, with the foreign-key SQLSTATE, any new task whose device or batch does not
  exist (one anti-join over the transition table); a task's device and batch never change; and
  devices and batches are never deleted (a device is revoked): with no DELETE, no TRUNCATE and no
  change of their id, a parent seen by the check stays, so the row locks of a foreign key have
  nothing left to guard.
- The foreign-key check of every event row (`fk_task_events_task_id_tasks`, which stays) runs
  inside the audit trigger functions. 7a0c0e1d2b03 planned it for each execution so that a plan
  made while `tasks` was nearly empty (a sequential scan) could not stay as the table grew; that
  re-planning was half of the check. Planned with sequential scans off, it is an index scan
  however small the table, so it can be kept. The functions' own statements read only the new
  rows (NEW, the transition table) and the parents' primary keys.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "b3a7c1e0d204"
down_revision: str | None = "7a0c0e1d2b03"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AUDIT_FUNCTIONS = ("tasks_record_inserted", "tasks_record_event")

# (foreign key, column, parent table) as 2ba5c01869e1 and 128f262ad165 made them.
REFERENCES = (
    ("fk_tasks_device_id_devices", "device_id", "devices"),
    ("fk_tasks_batch_id_task_batches", "batch_id", "task_batches"),
)

CHECK_PARENTS = """
CREATE FUNCTION tasks_check_parents() RETURNS trigger LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    missing text;
BEGIN
    SELECT n.device_id INTO missing FROM inserted_tasks n
    WHERE NOT EXISTS (SELECT FROM devices d WHERE d.id = n.device_id) LIMIT 1;
    IF FOUND THEN
        RAISE foreign_key_violation USING MESSAGE = format('device %s does not exist', missing),
            TABLE = 'tasks', CONSTRAINT = 'fk_tasks_device_id_devices';
    END IF;
    SELECT n.batch_id INTO missing FROM inserted_tasks n
    WHERE n.batch_id IS NOT NULL AND NOT EXISTS (SELECT FROM task_batches b WHERE b.id = n.batch_id) LIMIT 1;
    IF FOUND THEN
        RAISE foreign_key_violation USING MESSAGE = format('batch %s does not exist', missing),
            TABLE = 'tasks', CONSTRAINT = 'fk_tasks_batch_id_task_batches';
    END IF;
    RETURN NULL;
END $$
"""

KEEP_PARENTS = """
CREATE FUNCTION tasks_keep_parents() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE integrity_constraint_violation USING MESSAGE = format('%s rows are never deleted and their id never changes (%s)', TG_TABLE_NAME, TG_OP);
END $$
"""

KEEP_REFERENCES = """
CREATE FUNCTION tasks_keep_references() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE integrity_constraint_violation USING MESSAGE = 'a task''s device and batch never change';
END $$
"""


def upgrade() -> None:
    for function in AUDIT_FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function}() RESET plan_cache_mode")
        op.execute(f"ALTER FUNCTION {function}() SET enable_seqscan = off")
    for statement in (CHECK_PARENTS, KEEP_PARENTS, KEEP_REFERENCES):
        op.execute(statement)
    op.execute(
        "CREATE TRIGGER tasks_check_parents AFTER INSERT ON tasks REFERENCING NEW TABLE AS inserted_tasks "
        "FOR EACH STATEMENT EXECUTE FUNCTION tasks_check_parents()"
    )
    op.execute(
        "CREATE TRIGGER tasks_keep_references BEFORE UPDATE OF device_id, batch_id ON tasks FOR EACH ROW "
        "WHEN (NEW.device_id <> OLD.device_id OR NEW.batch_id IS DISTINCT FROM OLD.batch_id) "
        "EXECUTE FUNCTION tasks_keep_references()"
    )
    for _, _, parent in REFERENCES:
        op.execute(
            f"CREATE TRIGGER {parent}_stay BEFORE DELETE OR TRUNCATE OR UPDATE OF id ON {parent} "
            "FOR EACH STATEMENT EXECUTE FUNCTION tasks_keep_parents()"
        )
    for name, _, _ in REFERENCES:
        op.drop_constraint(name, "tasks", type_="foreignkey")


def downgrade() -> None:
    for name, column, parent in REFERENCES:
        op.create_foreign_key(name, "tasks", parent, [column], ["id"])
    for _, _, parent in REFERENCES:
        op.execute(f"DROP TRIGGER {parent}_stay ON {parent}")
    op.execute("DROP TRIGGER tasks_keep_references ON tasks")
    op.execute("DROP TRIGGER tasks_check_parents ON tasks")
    for function in ("tasks_keep_references", "tasks_keep_parents", "tasks_check_parents"):
        op.execute(f"DROP FUNCTION {function}()")
    for function in AUDIT_FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function}() RESET enable_seqscan")
        op.execute(f"ALTER FUNCTION {function}() SET plan_cache_mode = force_custom_plan")
