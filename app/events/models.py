from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base

# Device events draw their ids from the task events' sequence: one id space, so that one
# Last-Event-ID says where a reader stands in both logs.
EVENT_ID_SEQUENCE = "task_events_id_seq"


class DeviceEvent(Base):
    """Presence changes (online/offline), written by a trigger on `devices` (see the migration), and
    `rate_limited` / `blocked` when the device went over its limits (app/device_limits.py)."""

    __tablename__ = "device_events"

    id: Mapped[int] = mapped_column(
        BigInteger, primary_key=True, server_default=text(f"nextval('{EVENT_ID_SEQUENCE}')")
    )
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
