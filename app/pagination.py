"""Keyset pagination: the opaque cursor of a page, made of the (created_at, id) of its last row."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime

from app.errors import InvalidInput


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{row_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The (created_at, id) a cursor was made of; InvalidInput for anything else."""
    try:
        created_at, row_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return datetime.fromisoformat(created_at), uuid.UUID(row_id)
    except ValueError as exc:
        raise InvalidInput("cursor is not valid") from exc
