"""The live event stream: the event log read in id order, woken by the change feed, framed as SSE.

Ids come from one sequence, but a transaction may commit after a later one: an id missing from
the log may still appear. A reader therefore stops before such a gap until it is filled or
clearly permanent (a rolled-back insert): seen for GAP_WAIT_S, or followed by an event older
than that. So a client resuming with Last-Event-ID misses nothing that committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Row

from app.db import Sessions
from app.events import repository as repo
from app.events.feed import ChangeFeed
from app.events.schemas import EventRead
from swarm_device.protocol import TaskStatus

GAP_WAIT_S = 5.0
READ_LIMIT = 1000


def to_event(row: Row[Any]) -> EventRead:
    if "." in row.name:
        kind = row.name  # process events carry their whole type: process.started, step.opened, ...
    elif row.task_id is None:
        kind = f"device.{row.name}"
    elif row.version == 1:
        kind = "task.created"
    elif row.name == TaskStatus.IN_PROGRESS and row.details and "status_details" in row.details:
        kind = "task.progress"
    else:
        kind = f"task.{row.name}"
    return EventRead(
        id=row.id,
        type=kind,
        device_id=row.device_id,
        task_id=row.task_id,
        version=row.version,
        attempt=row.attempt,
        details=row.details,
        created_at=row.created_at,
    )


def sse_frame(event: EventRead) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.id, event.type.encode(), event.model_dump_json().encode())


@dataclass
class _Cursor:
    position: int
    gap_seen_at: float | None = None

    def take(self, rows: Sequence[Row[Any]]) -> list[Row[Any]]:
        """The rows that can be delivered now, in order; advances the position past them."""
        ready: list[Row[Any]] = []
        now = time.monotonic()
        old = datetime.now(UTC) - timedelta(seconds=GAP_WAIT_S)
        for row in rows:
            if row.id != self.position + 1:
                self.gap_seen_at = self.gap_seen_at or now
                if now - self.gap_seen_at < GAP_WAIT_S and row.created_at > old:
                    return ready
            self.gap_seen_at = None
            self.position = row.id
            ready.append(row)
        return ready


def _wanted(event: EventRead, device_id: str | None, types: frozenset[str]) -> bool:
    if device_id is not None and event.device_id != device_id:
        return False
    # `task` selects every task event, `task.succeeded` one kind.
    return not types or event.type in types or event.type.split(".")[0] in types


async def stream(
    sessions: Sessions,
    feed: ChangeFeed,
    *,
    after: int,
    device_id: str | None,
    types: frozenset[str],
    heartbeat_s: float,
) -> AsyncGenerator[bytes]:
    """SSE frames of the events after id `after`, then live; a comment line every `heartbeat_s`
    seconds of silence keeps proxies from closing the connection."""
    cursor = _Cursor(after)
    yield b"retry: 2000\n\n"
    idle_since = time.monotonic()
    # Subscribed until the client leaves (the generator is closed or cancelled).
    with feed.subscribed():
        while True:
            changed = feed.next_change()
            async with sessions() as session:
                rows = await repo.events_after(session, cursor.position, READ_LIMIT)
            for row in cursor.take(rows):
                event = to_event(row)
                if _wanted(event, device_id, types):
                    yield sse_frame(event)
                    idle_since = time.monotonic()
            if len(rows) == READ_LIMIT and cursor.gap_seen_at is None:
                continue  # more backlog to read
            # A pending gap is re-checked soon; otherwise wait for a wake-up or the heartbeat.
            timeout = 0.5 if cursor.gap_seen_at is not None else heartbeat_s - (time.monotonic() - idle_since)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(timeout, 0.0))
            if time.monotonic() - idle_since >= heartbeat_s:
                yield b": keep-alive\n\n"
                idle_since = time.monotonic()


async def current_position(sessions: Sessions) -> int:
    """Where a stream without Last-Event-ID starts: after the newest event committed now."""
    async with sessions() as session:
        return await repo.last_event_id(session)


def parse_types(values: list[str] | None) -> frozenset[str]:
    return frozenset(t.strip() for value in values or () for t in value.split(",") if t.strip())
