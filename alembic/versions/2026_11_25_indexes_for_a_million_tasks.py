"""indexes for a million tasks: a device's tasks, tasks by status, devices whose config is due

Measured at 100,000 devices and 1,000,000 tasks (bench/plans.py): listing a device's tasks and
the revoke path's `lock_pending_of_device` were sequential scans of `tasks` (100-300 ms), a
listing by a rare status read the whole `ix_tasks_created` (220 ms for none), and the periodic
`lock_config_due` scanned every device (13 ms every 10 s per process). With these, each reads a
few pages (< 0.1 ms).

Revision ID: 7a0c0e1d2b02
Revises: 7a0c0e1d2b01
Create Date: 2026-11-25 18:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7a0c0e1d2b02"
down_revision: str | None = "7a0c0e1d2b01"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_tasks_device_created", "tasks", ["device_id", "created_at", "id"], unique=False)
    op.create_index("ix_tasks_status_created", "tasks", ["status", "created_at", "id"], unique=False)
    op.create_index(
        "ix_devices_config_due",
        "devices",
        ["config_due_at"],
        unique=False,
        postgresql_where=sa.text("config_due_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_devices_config_due", table_name="devices", postgresql_where=sa.text("config_due_at IS NOT NULL"))
    op.drop_index("ix_tasks_status_created", table_name="tasks")
    op.drop_index("ix_tasks_device_created", table_name="tasks")
