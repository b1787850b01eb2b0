"""`tasks/next` and result reports at the service level, on the real database: each is one
autocommitted statement in the usual case, with the semantics of the longer form it replaced."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx
import pytest

from app.db import Sessions
from app.errors import Conflict, NotFound
from app.tasks import service
from swarm_device.protocol import ResultParams, TaskStatus
from tests.conftest import unique_device_id


async def new_device(client: httpx.AsyncClient) -> str:
    device_id = unique_device_id("pull")
    response = await client.post("/devices", json={"id": device_id})
    assert response.status_code == 201, response.text
    return device_id


async def new_task(client: httpx.AsyncClient, device_id: str) -> uuid.UUID:
    response = await client.post(f"/devices/{device_id}/tasks", json={"method": "work"})
    assert response.status_code == 201, response.text
    return uuid.UUID(response.json()["id"])


async def test_rival_pulls_of_one_device_all_get_the_one_task_handed_out(
    app_client: httpx.AsyncClient, sessions: Sessions, db: asyncpg.Connection
) -> None:
    device_id = await new_device(app_client)
    first = await new_task(app_client, device_id)
    await new_task(app_client, device_id)

    pulled = await asyncio.gather(*(service.next_task(sessions, device_id) for _ in range(8)))

    assert {task.id for task in pulled if task is not None} == {first}
    assert all(task is not None and task.status == TaskStatus.IN_PROGRESS for task in pulled)
    in_progress = await db.fetchval(
        "SELECT count(*) FROM tasks WHERE device_id = $1 AND status = 'in_progress'", device_id
    )
    assert in_progress == 1


async def test_a_pull_waits_for_a_locked_task_instead_of_answering_nothing(
    app_client: httpx.AsyncClient, sessions: Sessions, db: asyncpg.Connection
) -> None:
    device_id = await new_device(app_client)
    task_id = await new_task(app_client, device_id)

    # Another transaction (the notifier, a job) holds the row for a moment (decision 14).
    locker = db.transaction()
    await locker.start()
    await db.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", task_id)
    pull = asyncio.create_task(service.next_task(sessions, device_id))
    await asyncio.sleep(0.5)
    assert not pull.done()
    await locker.commit()

    pulled = await asyncio.wait_for(pull, 10)
    assert pulled is not None
    assert (pulled.id, pulled.status, pulled.attempt) == (task_id, TaskStatus.IN_PROGRESS, 1)


async def test_result_reports_finish_the_task_once_and_explain_the_rest(
    app_client: httpx.AsyncClient, sessions: Sessions
) -> None:
    device_id = await new_device(app_client)
    task_id = await new_task(app_client, device_id)
    succeeded = ResultParams(status="succeeded", result={"ok": 1})

    with pytest.raises(Conflict, match="not handed out"):
        await service.report_result(sessions, device_id, task_id, succeeded)
    with pytest.raises(NotFound):
        await service.report_result(sessions, "someone-else", task_id, succeeded)

    pulled = await service.next_task(sessions, device_id)
    assert pulled is not None
    assert pulled.id == task_id
    done = await service.report_result(sessions, device_id, task_id, succeeded)
    assert (done.status, done.result, done.error) == (TaskStatus.SUCCEEDED, {"ok": 1}, None)
    assert done.version == pulled.version + 1

    assert await service.report_result(sessions, device_id, task_id, succeeded) == done
    with pytest.raises(Conflict, match="already succeeded"):
        await service.report_result(sessions, device_id, task_id, ResultParams(status="failed"))
    assert await service.next_task(sessions, device_id) is None
