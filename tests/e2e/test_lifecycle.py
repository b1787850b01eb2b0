"""The task lifecycle of DESIGN.md section 5 against the real stack, with a bare MQTT device.

The scheduler runs every half second here (tests/conftest.py), so deadlines and expiry show
within a second or two of being due.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from app.settings import Settings
from swarm_device import protocol
from tests.conftest import DeviceCredentials, EnrolDevice
from tests.raw_device import RawDevice, raw_device

PROBLEM_JSON = "application/problem+json"


@pytest.fixture
async def device(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> AsyncIterator[tuple[DeviceCredentials, RawDevice]]:
    creds = await enrol_device("lc")
    async with raw_device(settings.broker.mqtt_host, settings.broker.mqtt_port, creds) as dev:
        yield creds, dev


async def create(client: httpx.AsyncClient, device_id: str, **body: Any) -> dict[str, Any]:
    response = await client.post(f"/devices/{device_id}/tasks", json={"method": "work", **body})
    assert response.status_code == 201, response.text
    task: dict[str, Any] = response.json()
    return task


async def get(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    response = await client.get(f"/tasks/{task_id}")
    assert response.status_code == 200, response.text
    task: dict[str, Any] = response.json()
    return task


async def wait_for_status(client: httpx.AsyncClient, task_id: str, wanted: str, within_s: float = 10) -> dict[str, Any]:
    async with asyncio.timeout(within_s):
        while True:
            task = await get(client, task_id)
            if task["status"] == wanted:
                return task
            await asyncio.sleep(0.1)


async def events_of(client: httpx.AsyncClient, task: dict[str, Any]) -> list[dict[str, Any]]:
    """The audit history, checked to hold exactly one entry per version up to the current one."""
    response = await client.get(f"/tasks/{task['id']}/events")
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()
    assert [e["version"] for e in events] == list(range(1, task["version"] + 1))
    assert events[-1]["status"] == task["status"]
    return events


def error_code(reply: dict[str, Any]) -> str:
    assert "error" in reply, reply
    code: str = reply["error"]["code"]
    return code


async def test_progress_extends_the_deadline_by_the_step_timeout(
    app_client: httpx.AsyncClient, device: tuple[DeviceCredentials, RawDevice]
) -> None:
    creds, dev = device
    # Three seconds: a step of one second plus its reply stays inside it on a crowded box.
    task = await create(app_client, creds.device_id, timeout_s=3, max_attempts=1)
    started = await dev.result(protocol.METHOD_TASKS_NEXT)
    assert (started["id"], started["status"], started["attempt"]) == (task["id"], "in_progress", 1)

    # Four steps of one second each: longer than the timeout in all, but never the timeout without news.
    for step in range(4):
        await asyncio.sleep(1)
        shown = await dev.result(protocol.progress_method(task["id"]), {"status_details": {"step": step}})
        assert shown["status"] == "in_progress"
        assert shown["status_details"] == {"step": step}
    done = await dev.result(protocol.result_method(task["id"]), {"status": "succeeded", "result": {"ok": 1}})
    assert done["status"] == "succeeded"

    final = await get(app_client, task["id"])
    assert (final["status"], final["attempt"], final["result"]) == ("succeeded", 1, {"ok": 1})
    events = await events_of(app_client, final)
    assert [e["details"]["status_details"] for e in events if e["details"] and "status_details" in e["details"]][
        :4
    ] == [{"step": s} for s in range(4)]

    # Silence after the last step: the step timeout ends the (only) attempt.
    # The step must reach the app inside the timeout of the claim: not one second, which a slow
    # reply can take.
    silent = await create(app_client, creds.device_id, timeout_s=3, max_attempts=1)
    assert (await dev.result(protocol.METHOD_TASKS_NEXT))["id"] == silent["id"]
    await dev.result(protocol.progress_method(silent["id"]), {"status_details": {"step": 0}})
    timed_out = await wait_for_status(app_client, silent["id"], "timed_out", within_s=15)
    assert timed_out["error"] is not None
    reply = await dev.call(protocol.progress_method(silent["id"]), {"status_details": {"late": True}})
    assert error_code(reply) == "conflict"


async def test_deadline_requeues_the_same_task_until_attempts_run_out(
    app_client: httpx.AsyncClient, device: tuple[DeviceCredentials, RawDevice]
) -> None:
    creds, dev = device
    task = await create(app_client, creds.device_id, timeout_s=1, max_attempts=2)
    assert (await dev.next_notice()) == {"event": "task_queued", "task_id": task["id"]}
    first = await dev.result(protocol.METHOD_TASKS_NEXT)
    assert (first["id"], first["attempt"]) == (task["id"], 1)

    # Past the deadline: queued again under the same id (the device can deduplicate), noticed again.
    assert (await dev.next_notice(within_s=15)) == {"event": "task_queued", "task_id": task["id"]}
    requeued = await get(app_client, task["id"])
    assert requeued["status"] in ("queued", "sent")
    assert requeued["attempt"] == 1
    # The first attempt's result, late: the task is not in progress any more.
    late = await dev.call(protocol.result_method(task["id"]), {"status": "succeeded"})
    assert error_code(late) == "conflict"

    second = await dev.result(protocol.METHOD_TASKS_NEXT)
    assert (second["id"], second["attempt"]) == (task["id"], 2)
    timed_out = await wait_for_status(app_client, task["id"], "timed_out", within_s=15)
    assert timed_out["attempt"] == 2
    # Attempts used up: the device is not handed the task a third time.
    assert (await dev.result(protocol.METHOD_TASKS_NEXT)) is None

    events = await events_of(app_client, timed_out)
    # Never handed out twice without a timeout in between: in_progress, back to queued, in_progress.
    moves = [(e["status"], e["attempt"]) for e in events if e["status"] in ("queued", "in_progress", "timed_out")]
    assert moves == [("queued", 0), ("in_progress", 1), ("queued", 1), ("in_progress", 2), ("timed_out", 2)]


async def test_ttl_expires_a_task_that_was_never_handed_out(
    app_client: httpx.AsyncClient, device: tuple[DeviceCredentials, RawDevice]
) -> None:
    creds, dev = device
    doomed = await create(app_client, creds.device_id, ttl_s=1)
    kept = await create(app_client, creds.device_id, ttl_s=60, params={"kept": True})
    expired = await wait_for_status(app_client, doomed["id"], "expired", within_s=15)
    assert expired["attempt"] == 0
    await events_of(app_client, expired)
    # Only the live one is handed out; the expired one never is.
    assert (await dev.result(protocol.METHOD_TASKS_NEXT))["id"] == kept["id"]
    reply = await dev.call(protocol.result_method(doomed["id"]), {"status": "succeeded"})
    assert error_code(reply) == "conflict"


async def test_cancel_tells_the_device_and_refuses_its_later_result(
    app_client: httpx.AsyncClient, device: tuple[DeviceCredentials, RawDevice]
) -> None:
    creds, dev = device
    running = await create(app_client, creds.device_id, params={"n": 1})
    waiting = await create(app_client, creds.device_id, params={"n": 2})
    assert (await dev.result(protocol.METHOD_TASKS_NEXT))["id"] == running["id"]
    # Both tasks' queued notices first (they are published after the commit, and may come late).
    queued = [await dev.next_notice(), await dev.next_notice()]
    assert {(n["event"], n["task_id"]) for n in queued} == {("task_queued", t["id"]) for t in (running, waiting)}

    for task in (running, waiting):
        response = await app_client.post(f"/tasks/{task['id']}/cancel")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "canceled"
        assert (await dev.next_notice()) == {"event": "task_canceled", "task_id": task["id"]}

    # The device finishes the canceled in-progress task anyway: `conflict`, and nothing changes.
    reply = await dev.call(protocol.result_method(running["id"]), {"status": "succeeded", "result": {"x": 1}})
    assert error_code(reply) == "conflict"
    progress = await dev.call(protocol.progress_method(running["id"]), {"status_details": {}})
    assert error_code(progress) == "conflict"
    assert (await dev.result(protocol.METHOD_TASKS_NEXT)) is None
    for task in (running, waiting):
        canceled = await get(app_client, task["id"])
        assert (canceled["status"], canceled["result"]) == ("canceled", None)
        await events_of(app_client, canceled)
        again = await app_client.post(f"/tasks/{task['id']}/cancel")
        assert again.status_code == 409
        assert again.headers["content-type"] == PROBLEM_JSON


async def test_final_states_never_change_and_a_repeated_report_is_answered(
    app_client: httpx.AsyncClient, device: tuple[DeviceCredentials, RawDevice], settings: Settings
) -> None:
    creds, dev = device
    task = await create(app_client, creds.device_id)
    await dev.result(protocol.METHOD_TASKS_NEXT)
    report = {"status": "failed", "error": {"message": "disk full"}}
    first = await dev.result(protocol.result_method(task["id"]), report)
    assert (first["status"], first["error"]) == ("failed", {"message": "disk full"})

    # The same report again (the device did not see the reply): answered, nothing changes.
    repeated = await dev.result(protocol.result_method(task["id"]), report)
    assert repeated == first
    other = await dev.call(protocol.result_method(task["id"]), {"status": "succeeded"})
    assert error_code(other) == "conflict"
    assert (await app_client.post(f"/tasks/{task['id']}/cancel")).status_code == 409
    final = await get(app_client, task["id"])
    assert final == first
    assert len(await events_of(app_client, final)) == final["version"]

    # Not even SQL past the service may change a final task (the guard trigger).
    dsn = make_url(settings.database.url.get_secret_value()).set(drivername="postgresql")
    conn = await asyncpg.connect(dsn.render_as_string(hide_password=False))
    try:
        for statement in (
            "UPDATE tasks SET status = 'queued' WHERE id = $1",
            "UPDATE tasks SET result = '{}' WHERE id = $1",
        ):
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute(statement, uuid.UUID(task["id"]))
    finally:
        await conn.close()


async def test_priority_then_age_decides_what_is_handed_out_next(
    app_client: httpx.AsyncClient, device: tuple[DeviceCredentials, RawDevice]
) -> None:
    creds, dev = device
    low = await create(app_client, creds.device_id, priority=-5)
    old = await create(app_client, creds.device_id, priority=5)
    young = await create(app_client, creds.device_id, priority=5)
    normal = await create(app_client, creds.device_id)
    order = []
    for _ in range(4):
        task = await dev.result(protocol.METHOD_TASKS_NEXT)
        # One at a time: asking again before the result shows the same in-progress task.
        assert (await dev.result(protocol.METHOD_TASKS_NEXT))["id"] == task["id"]
        await dev.result(protocol.result_method(task["id"]), {"status": "succeeded"})
        order.append(task["id"])
    assert order == [old["id"], young["id"], normal["id"], low["id"]]


async def test_idempotency_key_returns_the_same_task_or_409(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice
) -> None:
    creds = await enrol_device("idem")
    other = await enrol_device("idem")
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = {"method": "reboot", "params": {"a": 1}}
    path = f"/devices/{creds.device_id}/tasks"

    first = await app_client.post(path, json=body, headers=key)
    concurrent = await asyncio.gather(*(app_client.post(path, json=body, headers=key) for _ in range(5)))
    assert first.status_code == 201
    assert {r.status_code for r in concurrent} == {200}
    assert {r.json()["id"] for r in concurrent} == {first.json()["id"]}

    changed = await app_client.post(path, json={**body, "params": {"a": 2}}, headers=key)
    assert changed.status_code == 409
    assert changed.headers["content-type"] == PROBLEM_JSON
    assert changed.json()["status"] == 409
    # Keys are per device: the same key elsewhere is another task.
    elsewhere = await app_client.post(f"/devices/{other.device_id}/tasks", json=body, headers=key)
    assert elsewhere.status_code == 201
    assert elsewhere.json()["id"] != first.json()["id"]
    listed = await app_client.get("/tasks", params={"device_id": creds.device_id})
    assert [t["id"] for t in listed.json()["items"]] == [first.json()["id"]]


async def test_list_filters_and_cursor_pagination(app_client: httpx.AsyncClient, enrol_device: EnrolDevice) -> None:
    creds = await enrol_device("list")
    created = [await create(app_client, creds.device_id, method="a" if i % 2 else "b") for i in range(7)]
    await app_client.post(f"/tasks/{created[0]['id']}/cancel")

    async def paged(**filters: Any) -> list[str]:
        """Every page of 3, in order."""
        pages, cursor = [], None
        while True:
            params: dict[str, Any] = {"device_id": creds.device_id, "limit": 3, **filters}
            if cursor:
                params["cursor"] = cursor
            page = (await app_client.get("/tasks", params=params)).json()
            pages.append([t["id"] for t in page["items"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert all(len(page) <= 3 for page in pages)
        return [task_id for page in pages for task_id in page]

    newest_first = [t["id"] for t in reversed(created)]
    assert await paged() == newest_first  # each exactly once
    # Several statuses are listed by merging the newest of each: still one order, each once.
    assert await paged(status=["sent", "canceled", "queued"]) == newest_first

    async def ids(**params: Any) -> set[str]:
        response = await app_client.get("/tasks", params={"device_id": creds.device_id, **params})
        assert response.status_code == 200, response.text
        return {t["id"] for t in response.json()["items"]}

    assert await ids(method="a") == {t["id"] for t in created if t["method"] == "a"}
    assert await ids(status="canceled") == {created[0]["id"]}
    assert await ids(status=["queued", "sent"]) == {t["id"] for t in created[1:]}
    middle = created[3]["created_at"]
    assert await ids(created_before=middle) == {t["id"] for t in created[:3]}
    assert await ids(created_after=middle) == {t["id"] for t in created[3:]}

    bad = await app_client.get("/tasks", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 422
    assert bad.headers["content-type"] == PROBLEM_JSON


async def test_unknown_tasks_are_problem_json_404(app_client: httpx.AsyncClient) -> None:
    unknown = uuid.uuid4()
    for response in (
        await app_client.get(f"/tasks/{unknown}"),
        await app_client.get(f"/tasks/{unknown}/events"),
        await app_client.post(f"/tasks/{unknown}/cancel"),
    ):
        assert response.status_code == 404
        assert response.headers["content-type"] == PROBLEM_JSON
        assert response.json()["status"] == 404


async def test_a_nul_character_postgresql_cannot_store_is_refused_as_invalid(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice
) -> None:
    creds = await enrol_device("nul")
    for path, body in [
        (f"/devices/{creds.device_id}/tasks", {"method": "echo", "params": {"s": "a\u0000b"}}),
        (f"/devices/{creds.device_id}/tasks", {"method": "echo", "params": {"nested": [{"\u0000": 1}]}}),
        ("/tasks/batch", {"method": "echo", "params": {"s": "\u0000"}, "device_ids": [creds.device_id]}),
    ]:
        refused = await app_client.post(path, json=body)
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"] == PROBLEM_JSON
        assert "U+0000" in refused.text
    config = await app_client.put(f"/devices/{creds.device_id}/config", json={"name": "x\u0000"})
    assert config.status_code == 422, config.text
    listed = await app_client.get("/tasks", params={"device_id": creds.device_id})
    assert listed.json()["items"] == []


async def test_a_result_with_next_hands_out_the_next_task_and_one_without_does_not(
    app_client: httpx.AsyncClient, device: tuple[DeviceCredentials, RawDevice]
) -> None:
    creds, dev = device
    first = await create(app_client, creds.device_id)
    second = await create(app_client, creds.device_id)
    third = await create(app_client, creds.device_id)
    assert (await dev.result(protocol.METHOD_TASKS_NEXT))["id"] == first["id"]

    done = await dev.result(protocol.result_method(first["id"]), {"status": "succeeded", "next": True})
    assert (done["id"], done["status"]) == (first["id"], "succeeded")
    handed = done["next_task"]
    assert (handed["id"], handed["status"]) == (second["id"], "in_progress")
    # The reply was lost, say: the report is retried and answered again with the same task,
    # and a pull hands out that same task too.
    again = await dev.result(protocol.result_method(first["id"]), {"status": "succeeded", "next": True})
    assert again["next_task"]["id"] == second["id"]
    assert (await dev.result(protocol.METHOD_TASKS_NEXT))["id"] == second["id"]

    # An older device's report (no `next`): the reply it always got, nothing handed out.
    old = await dev.result(protocol.result_method(second["id"]), {"status": "succeeded"})
    assert old["status"] == "succeeded"
    assert "next_task" not in old
    assert (await get(app_client, third["id"]))["status"] in ("queued", "sent")
    assert (await dev.result(protocol.METHOD_TASKS_NEXT))["id"] == third["id"]
    last = await dev.result(protocol.result_method(third["id"]), {"status": "succeeded", "next": True})
    assert last["next_task"] is None
