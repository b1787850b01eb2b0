"""Intake batching (app/tasks/intake.py) against the real database: requests that arrive together
share one INSERT and one commit, and each still gets its own answer."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.broker import ConfirmedPublisher
from app.db import create_engine, create_sessionmaker
from app.errors import is_infrastructure_error
from app.settings import Settings, TaskSettings
from app.tasks.intake import IntakeBatcher
from app.tasks.models import Task
from app.tasks.notifier import Notifier
from app.tasks.schemas import TaskCreate
from app.tasks.service import new_task
from tests.conftest import unique_device_id

PROBLEM_JSON = "application/problem+json"


async def new_device(client: httpx.AsyncClient) -> str:
    device_id = unique_device_id("in")
    assert (await client.post("/devices", json={"id": device_id})).status_code == 201
    return device_id


@pytest.fixture
async def sessions(settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(settings.database)
    yield create_sessionmaker(engine)
    await engine.dispose()


def batcher(sessions: async_sessionmaker[AsyncSession], settings: Settings) -> IntakeBatcher:
    # Never started: notices only queue up in memory (the tasks keep notice_due_at).
    notifier = Notifier(ConfirmedPublisher(settings.broker), sessions)
    return IntakeBatcher(sessions, notifier, writers=1)


async def test_requests_that_arrive_together_each_get_their_own_answer(app_client: httpx.AsyncClient) -> None:
    first, second, revoked = [await new_device(app_client) for _ in range(3)]
    assert (await app_client.delete(f"/devices/{revoked}")).status_code == 200
    key = {"Idempotency-Key": uuid.uuid4().hex}

    def post(device_id: str, n: int, headers: dict[str, str] | None = None) -> asyncio.Future[httpx.Response]:
        body = {"method": "echo", "params": {"n": n}}
        return asyncio.ensure_future(app_client.post(f"/devices/{device_id}/tasks", json=body, headers=headers))

    plain = [post(first if n % 2 else second, n) for n in range(40)]
    unknown = [post(unique_device_id("nobody"), n) for n in range(3)]
    gone = [post(revoked, n) for n in range(3)]
    same_key = [post(first, -1, key) for _ in range(4)]
    await asyncio.gather(*plain, *unknown, *gone, *same_key)

    assert [r.result().status_code for r in plain] == [201] * 40
    for response in (r.result() for r in plain):
        task = response.json()
        assert response.headers["Location"] == f"/api/v1/tasks/{task['id']}"
        stored = (await app_client.get(response.headers["Location"].removeprefix("/api/v1"))).json()
        assert {k: stored[k] for k in ("id", "device_id", "params", "created_at")} == {
            k: task[k] for k in ("id", "device_id", "params", "created_at")
        }
    assert len({r.result().json()["id"] for r in plain}) == 40
    for response in (r.result() for r in [*unknown, *gone]):
        assert response.status_code == 404
        assert response.headers["content-type"] == PROBLEM_JSON
    assert sorted(r.result().status_code for r in same_key) == [200, 200, 200, 201]
    assert len({r.result().json()["id"] for r in same_key}) == 1

    other_body = await app_client.post(f"/devices/{first}/tasks", json={"method": "other"}, headers=key)
    assert other_body.status_code == 409


async def test_one_bad_row_fails_only_its_own_request(
    app_client: httpx.AsyncClient,
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    device_id = await new_device(app_client)
    intake = batcher(sessions, settings)
    good = [new_task(TaskSettings(), device_id, TaskCreate(method="echo", params={"n": n})) for n in range(5)]
    # Longer than the column allows: the database refuses it (the API's validation would earlier).
    bad = new_task(TaskSettings(), device_id, TaskCreate.model_construct(method="x" * 200, params={}, priority=0))

    with caplog.at_level(logging.WARNING, logger="app.tasks.intake"):
        outcomes = await asyncio.gather(*(intake.create(t) for t in [*good, bad]), return_exceptions=True)

    assert "writing them one by one" in caplog.text  # they were one batch, and it failed
    failure = outcomes[-1]
    assert isinstance(failure, Exception)
    assert not is_infrastructure_error(failure)
    created = [o for o in outcomes[:-1] if not isinstance(o, BaseException)]
    assert [(read.id, is_new) for read, is_new in created] == [(t.id, True) for t in good]
    async with sessions() as session:
        stored = set((await session.execute(select(Task.id).where(Task.device_id == device_id))).scalars())
    assert stored == {t.id for t in good}


async def test_an_outage_fails_every_waiting_request_as_an_outage(settings: Settings) -> None:
    # Nothing listens on port 1: every connection attempt is refused.
    unreachable = settings.database.model_copy(
        update={"url": SecretStr("postgresql+asyncpg://swarm@127.0.0.1:1/swarm")}
    )
    engine = create_engine(unreachable)
    try:
        intake = batcher(create_sessionmaker(engine), settings)
        tasks = [new_task(TaskSettings(), "any-device", TaskCreate(method="echo")) for _ in range(3)]
        outcomes = await asyncio.gather(*(intake.create(t) for t in tasks), return_exceptions=True)
    finally:
        await engine.dispose()
    assert all(isinstance(o, Exception) and is_infrastructure_error(o) for o in outcomes)
