"""baseline: devices, tasks and their events, batches, presence; the audit and integrity triggers

Revision ID: b3a7c1e0d204
Revises:
Create Date: 2026-11-25 22:30:00.000000

The whole schema as it stood at b3a7c1e0d204, in one place (the project is unreleased; the eight
migrations that built it are in git history). It keeps that revision id, so a database already at
b3a7c1e0d204 is at this baseline, and later migrations chain onto it. Why the triggers are shaped
as they are: docs/decisions.md (23) and docs/performance.md.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "b3a7c1e0d204"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FINAL = "('succeeded', 'failed', 'rejected', 'timed_out', 'expired', 'canceled')"

TABLES = (
    """
CREATE TABLE devices (
    id VARCHAR(64) NOT NULL,
    firmware VARCHAR(128),
    model VARCHAR(128),
    capabilities JSONB DEFAULT '[]'::jsonb NOT NULL,
    online BOOLEAN DEFAULT false NOT NULL,
    last_seen_at TIMESTAMP WITH TIME ZONE,
    hello_at TIMESTAMP WITH TIME ZONE,
    reported_state JSONB,
    reported_at TIMESTAMP WITH TIME ZONE,
    revoked_at TIMESTAMP WITH TIME ZONE,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    desired_config JSONB,
    desired_at TIMESTAMP WITH TIME ZONE,
    config_due_at TIMESTAMP WITH TIME ZONE,
    CONSTRAINT pk_devices PRIMARY KEY (id)
)""",
    "CREATE INDEX ix_devices_config_due ON devices (config_due_at) WHERE config_due_at IS NOT NULL",
    """
CREATE TABLE device_certificates (
    serial VARCHAR(64) NOT NULL,
    device_id VARCHAR(64) NOT NULL,
    fingerprint_sha256 VARCHAR(64) NOT NULL,
    not_after TIMESTAMP WITH TIME ZONE NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    revoked_at TIMESTAMP WITH TIME ZONE,
    CONSTRAINT pk_device_certificates PRIMARY KEY (serial),
    CONSTRAINT fk_device_certificates_device_id_devices FOREIGN KEY(device_id) REFERENCES devices (id)
)""",
    "CREATE INDEX ix_device_certificates_device_id ON device_certificates (device_id)",
    # device_id and batch_id have no foreign keys: tasks_check_parents checks them per INSERT.
    """
CREATE TABLE tasks (
    id UUID NOT NULL,
    device_id VARCHAR(64) NOT NULL,
    method VARCHAR(128) NOT NULL,
    params JSONB NOT NULL,
    status VARCHAR(16) DEFAULT 'queued' NOT NULL,
    priority INTEGER DEFAULT 0 NOT NULL,
    attempt INTEGER DEFAULT 0 NOT NULL,
    max_attempts INTEGER NOT NULL,
    timeout_s INTEGER NOT NULL,
    version INTEGER DEFAULT 1 NOT NULL,
    expires_at TIMESTAMP WITH TIME ZONE,
    deadline_at TIMESTAMP WITH TIME ZONE,
    sent_at TIMESTAMP WITH TIME ZONE,
    started_at TIMESTAMP WITH TIME ZONE,
    finished_at TIMESTAMP WITH TIME ZONE,
    status_details JSONB,
    result JSONB,
    error JSONB,
    notice_due_at TIMESTAMP WITH TIME ZONE,
    idempotency_key VARCHAR(128),
    request_hash VARCHAR(64),
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    batch_id UUID,
    CONSTRAINT pk_tasks PRIMARY KEY (id),
    CONSTRAINT ck_tasks_status
        CHECK (status IN ('queued', 'sent', 'in_progress', 'succeeded', 'failed', 'rejected', 'timed_out', 'expired', 'canceled')),
    CONSTRAINT ck_tasks_attempt CHECK (attempt >= 0 AND attempt <= max_attempts)
)""",
    "CREATE INDEX ix_tasks_created ON tasks (created_at, id)",
    "CREATE INDEX ix_tasks_device_created ON tasks (device_id, created_at, id)",
    "CREATE INDEX ix_tasks_status_created ON tasks (status, created_at, id)",
    "CREATE INDEX ix_tasks_deadline ON tasks (deadline_at) WHERE status = 'in_progress'",
    "CREATE INDEX ix_tasks_expiry ON tasks (expires_at) WHERE status IN ('queued', 'sent') AND expires_at IS NOT NULL",
    "CREATE INDEX ix_tasks_notice_due ON tasks (notice_due_at) WHERE notice_due_at IS NOT NULL",
    "CREATE INDEX ix_tasks_pending ON tasks (device_id, priority DESC, created_at) WHERE status IN ('queued', 'sent')",
    "CREATE INDEX ix_tasks_batch ON tasks (batch_id) WHERE batch_id IS NOT NULL",
    "CREATE UNIQUE INDEX uq_tasks_device_in_progress ON tasks (device_id) WHERE status = 'in_progress'",
    "CREATE UNIQUE INDEX uq_tasks_idempotency ON tasks (device_id, idempotency_key) WHERE idempotency_key IS NOT NULL",
    """
CREATE TABLE task_events (
    id BIGSERIAL NOT NULL,
    task_id UUID NOT NULL,
    version INTEGER NOT NULL,
    status VARCHAR(16) NOT NULL,
    attempt INTEGER NOT NULL,
    details JSONB,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    CONSTRAINT pk_task_events PRIMARY KEY (id),
    CONSTRAINT fk_task_events_task_id_tasks FOREIGN KEY(task_id) REFERENCES tasks (id) ON DELETE CASCADE
)""",
    "CREATE UNIQUE INDEX uq_task_events_task_version ON task_events (task_id, version)",
    """
CREATE TABLE device_connections (
    name VARCHAR(255) NOT NULL,
    device_id VARCHAR(64) NOT NULL,
    connected_at TIMESTAMP WITH TIME ZONE NOT NULL,
    CONSTRAINT pk_device_connections PRIMARY KEY (name),
    CONSTRAINT fk_device_connections_device_id_devices FOREIGN KEY(device_id) REFERENCES devices (id) ON DELETE CASCADE
)""",
    "CREATE INDEX ix_device_connections_device_id ON device_connections (device_id)",
    """
CREATE TABLE task_batches (
    id UUID NOT NULL,
    idempotency_key VARCHAR(128),
    request_hash VARCHAR(64) NOT NULL,
    task_count INTEGER NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    CONSTRAINT pk_task_batches PRIMARY KEY (id),
    CONSTRAINT uq_task_batches_idempotency_key UNIQUE (idempotency_key)
)""",
    # Task and device events share one sequence: the SSE stream orders them by id.
    """
CREATE TABLE device_events (
    id BIGINT DEFAULT nextval('task_events_id_seq') NOT NULL,
    device_id VARCHAR(64) NOT NULL,
    event VARCHAR(16) NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    CONSTRAINT pk_device_events PRIMARY KEY (id),
    CONSTRAINT fk_device_events_device_id_devices FOREIGN KEY(device_id) REFERENCES devices (id) ON DELETE CASCADE
)""",
    "CREATE INDEX ix_device_events_device_id ON device_events (device_id)",
)

# Final tasks never change again, whatever code path tries.
GUARD_FINAL = (
    """
CREATE FUNCTION tasks_guard_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status IN ('succeeded', 'failed', 'rejected', 'timed_out', 'expired', 'canceled') AND NEW IS DISTINCT FROM OLD THEN
        RAISE EXCEPTION 'task % is % (final) and cannot change', OLD.id, OLD.status
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$
""",
    # The WHEN repeats the function's test: other rows call no PL/pgSQL.
    f"CREATE TRIGGER tasks_guard_final BEFORE UPDATE ON tasks FOR EACH ROW "
    f"WHEN (OLD.status IN {FINAL} AND NEW IS DISTINCT FROM OLD) EXECUTE FUNCTION tasks_guard_final()",
)

# The audit history: one task event per new task and per new version of a task. An INSERT writes
# its events in one statement from its transition table, in the order of its rows; an UPDATE per
# row (a statement trigger would slow the device's one-row claim and result). The functions' own
# statements (and the foreign-key check of each event) are planned with sequential scans off, so a
# plan made while `tasks` was small stays an index scan as it grows.
AUDIT = (
    """
CREATE FUNCTION tasks_record_inserted() RETURNS trigger LANGUAGE plpgsql SET enable_seqscan = off AS $$
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
    """
CREATE FUNCTION tasks_record_event() RETURNS trigger LANGUAGE plpgsql SET enable_seqscan = off AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.version <> OLD.version THEN
        INSERT INTO task_events (task_id, version, status, attempt, details)
        VALUES (NEW.id, NEW.version, NEW.status, NEW.attempt, NULLIF(jsonb_strip_nulls(jsonb_build_object(
            'status_details', NEW.status_details, 'result', NEW.result, 'error', NEW.error)), '{}'::jsonb));
    END IF;
    RETURN NULL;
END $$
""",
    "CREATE TRIGGER tasks_record_event AFTER UPDATE ON tasks FOR EACH ROW WHEN (NEW.version <> OLD.version) "
    "EXECUTE FUNCTION tasks_record_event()",
)

# A task's device and batch are checked once per INSERT statement, not by a foreign key per row
# (decision 23). That holds because a task's device and batch never change, and devices and
# batches are never deleted (a device is revoked) nor change their id.
PARENTS = (
    """
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
""",
    "CREATE TRIGGER tasks_check_parents AFTER INSERT ON tasks REFERENCING NEW TABLE AS inserted_tasks "
    "FOR EACH STATEMENT EXECUTE FUNCTION tasks_check_parents()",
    """
CREATE FUNCTION tasks_keep_references() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE integrity_constraint_violation USING MESSAGE = 'a task''s device and batch never change';
END $$
""",
    "CREATE TRIGGER tasks_keep_references BEFORE UPDATE OF device_id, batch_id ON tasks FOR EACH ROW "
    "WHEN (NEW.device_id <> OLD.device_id OR NEW.batch_id IS DISTINCT FROM OLD.batch_id) "
    "EXECUTE FUNCTION tasks_keep_references()",
    """
CREATE FUNCTION tasks_keep_parents() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE integrity_constraint_violation USING MESSAGE = format('%s rows are never deleted and their id never changes (%s)', TG_TABLE_NAME, TG_OP);
END $$
""",
    "CREATE TRIGGER devices_stay BEFORE DELETE OR TRUNCATE OR UPDATE OF id ON devices "
    "FOR EACH STATEMENT EXECUTE FUNCTION tasks_keep_parents()",
    "CREATE TRIGGER task_batches_stay BEFORE DELETE OR TRUNCATE OR UPDATE OF id ON task_batches "
    "FOR EACH STATEMENT EXECUTE FUNCTION tasks_keep_parents()",
)

# Presence changes leave a row in the device event log, whatever code path changed them.
DEVICE_EVENTS = (
    """
CREATE FUNCTION devices_record_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.online IS DISTINCT FROM OLD.online THEN
        INSERT INTO device_events (device_id, event)
        VALUES (NEW.id, CASE WHEN NEW.online THEN 'online' ELSE 'offline' END);
    END IF;
    RETURN NULL;
END $$
""",
    "CREATE TRIGGER devices_record_event AFTER UPDATE OF online ON devices FOR EACH ROW "
    "EXECUTE FUNCTION devices_record_event()",
)

FUNCTIONS = (
    "tasks_guard_final",
    "tasks_record_inserted",
    "tasks_record_event",
    "tasks_check_parents",
    "tasks_keep_references",
    "tasks_keep_parents",
    "devices_record_event",
)


def upgrade() -> None:
    # asyncpg runs one statement per call.
    for statement in (*TABLES, *GUARD_FINAL, *AUDIT, *PARENTS, *DEVICE_EVENTS):
        op.execute(statement)


def downgrade() -> None:
    # device_events first: its ids come from task_events' sequence.
    for table in ("device_events", "task_batches", "device_connections", "task_events", "tasks", "device_certificates", "devices"):
        op.execute(f"DROP TABLE {table}")
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION {function}()")
