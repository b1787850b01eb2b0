"""Wake-ups by polling (app/events/feed.py), with a feed and waiters of their own, as a second app
instance would have: a commit made through the session's app wakes them, and nothing polls while
nobody waits."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import create_engine, create_sessionmaker
from app.events import service as events
from app.events.feed import ChangeFeed
from app.settings import Settings
from app.tasks.waiters import TaskWaiters
from tests.conftest import unique_device_id

INTERVAL_S = 0.02


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.database)
    yield engine
    await engine.dispose()


@pytest.fixture
async def feed(engine: AsyncEngine) -> AsyncIterator[ChangeFeed]:
    feed = ChangeFeed(create_sessionmaker(engine), INTERVAL_S)
    yield feed
    await feed.stop()


@pytest.fixture
async def waiters(engine: AsyncEngine, feed: ChangeFeed) -> AsyncIterator[TaskWaiters]:
    waiters = TaskWaiters(create_sessionmaker(engine), feed)
    yield waiters
    await waiters.stop()


def count_statements(engine: AsyncEngine) -> list[str]:
    """Every statement the engine sends from now on (pings and BEGIN are not statements here)."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    return sent


async def new_tasks(client: httpx.AsyncClient, count: int) -> list[str]:
    device_id = unique_device_id("wake")
    assert (await client.post("/devices", json={"id": device_id})).status_code == 201
    ids = []
    for _ in range(count):
        response = await client.post(f"/devices/{device_id}/tasks", json={"method": "echo"})
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


async def until_idle(feed: ChangeFeed) -> None:
    # The poller stops after its current look: one interval and one query, with room to spare.
    await asyncio.sleep(25 * INTERVAL_S)
    assert not feed.polling


async def test_waiter_is_woken_by_a_task_finished_elsewhere(
    app_client: httpx.AsyncClient, waiters: TaskWaiters
) -> None:
    finished_id, open_id = await new_tasks(app_client, 2)
    with waiters.watch(uuid.UUID(finished_id)) as finished, waiters.watch(uuid.UUID(open_id)) as still_open:
        # Canceled by the session's app: its own engine and connections, as another instance.
        assert (await app_client.post(f"/tasks/{finished_id}/cancel")).json()["status"] == "canceled"
        # Only a wake-up sets the event (the 5 s re-read is the request's, not the waiter's).
        await asyncio.wait_for(finished.wait(), 10)
        assert not still_open.is_set()


async def test_nothing_polls_while_nobody_waits(
    app_client: httpx.AsyncClient, engine: AsyncEngine, feed: ChangeFeed, waiters: TaskWaiters
) -> None:
    (task_id,) = await new_tasks(app_client, 1)
    sent = count_statements(engine)
    await asyncio.sleep(10 * INTERVAL_S)
    assert sent == []
    assert not feed.polling

    # A long-poll, then an SSE stream, each polls while it waits and not after.
    with waiters.watch(uuid.UUID(task_id)):
        await asyncio.sleep(10 * INTERVAL_S)
    assert sent
    await until_idle(feed)
    after_long_poll = len(sent)

    sessions = create_sessionmaker(engine)
    after = await events.current_position(sessions)
    frames = events.stream(sessions, feed, after=after, device_id="nobody", types=frozenset(), heartbeat_s=1)
    assert await anext(frames) == b"retry: 2000\n\n"
    assert await anext(frames) == b": keep-alive\n\n"
    await frames.aclose()
    assert len(sent) > after_long_poll
    await until_idle(feed)
    after_stream = len(sent)

    await asyncio.sleep(10 * INTERVAL_S)
    assert len(sent) == after_stream
    assert not feed.polling
