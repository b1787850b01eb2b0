"""final tasks never change: the guard trigger refuses any change of a final task, not only of its status

Revision ID: 0fe196a2d66f
Revises: 128f262ad165
Create Date: 2026-11-25 16:52:06.284860
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0fe196a2d66f'
down_revision: str | None = '128f262ad165'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FINAL = "('succeeded', 'failed', 'rejected', 'timed_out', 'expired', 'canceled')"


def _guard(changed: str) -> str:
    return f"""
CREATE OR REPLACE FUNCTION tasks_guard_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status IN {FINAL} AND {changed} THEN
        RAISE EXCEPTION 'task % is % (final) and cannot change', OLD.id, OLD.status
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$
"""


def upgrade() -> None:
    # A result, an error or a version of a final task is as settled as its status.
    op.execute(_guard("NEW IS DISTINCT FROM OLD"))


def downgrade() -> None:
    op.execute(_guard("NEW.status IS DISTINCT FROM OLD.status"))
