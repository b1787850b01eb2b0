"""devices.last_limited_at and blocked_until: a device over its limits, for the operator

Revision ID: c4f1a9d7e3b2
Revises: b3a7c1e0d204
Create Date: 2026-12-04 16:00:00.000000

Set at most once per device per report window (decision 46), together with a `rate_limited` or
`blocked` row in `device_events`; `blocked_until` while the broker refuses the device's
connections (a periodic job lifts the block). Nullable, no default: adding them rewrites nothing.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "c4f1a9d7e3b2"
down_revision: str | None = "b5793662cf44"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("last_limited_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("devices", sa.Column("blocked_until", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_devices_blocked_until", "devices", ["blocked_until"], postgresql_where=sa.text("blocked_until IS NOT NULL")
    )


def downgrade() -> None:
    op.drop_index("ix_devices_blocked_until", table_name="devices")
    op.drop_column("devices", "blocked_until")
    op.drop_column("devices", "last_limited_at")
