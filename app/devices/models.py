from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, Timestamped


class Device(Timestamped, Base):
    __tablename__ = "devices"
    # The periodic config publisher looks for due devices only.
    __table_args__ = (
        Index("ix_devices_config_due", "config_due_at", postgresql_where=text("config_due_at IS NOT NULL")),
        Index("ix_devices_blocked_until", "blocked_until", postgresql_where=text("blocked_until IS NOT NULL")),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    firmware: Mapped[str | None] = mapped_column(String(128))
    model: Mapped[str | None] = mapped_column(String(128))
    capabilities: Mapped[list[str]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    online: Mapped[bool] = mapped_column(server_default=text("false"))
    last_seen_at: Mapped[datetime | None]
    hello_at: Mapped[datetime | None]
    reported_state: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    reported_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    desired_config: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    desired_at: Mapped[datetime | None]
    # Outbox: set until the desired config is published (retained) to the device's config topic.
    config_due_at: Mapped[datetime | None]
    # When it last went over its limits (set once per report window), and until when the broker
    # refuses its connections for it (decision 46).
    last_limited_at: Mapped[datetime | None]
    blocked_until: Mapped[datetime | None]


class DeviceCertificate(Base):
    """Every certificate issued to a device; a revoked device's serials stay recorded as revoked."""

    __tablename__ = "device_certificates"

    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    fingerprint_sha256: Mapped[str] = mapped_column(String(64))
    not_after: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    revoked_at: Mapped[datetime | None]


class DeviceConnection(Base):
    """Open broker connections of devices, from the broker's connection events (presence).

    Keyed by the broker's connection name: `connection.closed` carries only that and the pid.
    """

    __tablename__ = "device_connections"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    connected_at: Mapped[datetime]
