"""Business processes through the API with the real stack: PostgreSQL, the app's jobs, a device
over MQTT (the SDK) and a real SMTP server in-process (aiosmtpd)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from app.auth import Scope, mint_token
from app.db import Sessions
from app.events import repository as event_log
from app.events import service as event_service
from app.settings import Settings
from swarm_device.tasks import TaskContext
from tests.conftest import SMTP_PORT, EnrolDevice
from tests.e2e.test_sdk_device import make_device, running
from tests.polling import eventually

EXAMPLE = Path(__file__).resolve().parents[2] / "app" / "processes" / "examples" / "predictive_maintenance.json"
WITHIN_S = 30.0


class Mailbox:
    """A real SMTP server on SMTP_PORT that keeps what arrives; it can be stopped (a mail server
    that is down) and started again."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._controller: Controller | None = None

    async def handle_DATA(self, _server: SMTP, _session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"

    def start(self) -> None:
        self._controller = Controller(self, hostname="127.0.0.1", port=SMTP_PORT)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def to(self, address: str, subject_part: str = "") -> list[Message]:
        return [m for m in self.messages if address in str(m["To"]) and subject_part in str(m["Subject"])]


@pytest.fixture(scope="session")
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox()
    box.start()
    try:
        yield box
    finally:
        box.stop()


def headers(settings: Settings, *scopes: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(settings.auth, 'tests-person', scopes, 3600)}"}


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def example(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(EXAMPLE.read_text())
    return {**body, "name": name}


async def define(client: httpx.AsyncClient, name: str, definition: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/processes/definitions", json={"name": name, "definition": definition})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def instance(client: httpx.AsyncClient, instance_id: str) -> dict[str, Any]:
    response = await client.get(f"/processes/instances/{instance_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def settled(client: httpx.AsyncClient, instance_id: str, predicate: Any) -> dict[str, Any]:
    """The instance once `predicate(instance)` holds."""
    found: dict[str, Any] = {}

    async def check() -> bool:
        found.update(await instance(client, instance_id))
        return bool(predicate(found))

    await eventually(check, within_s=WITHIN_S, every_s=0.2)
    return found


def open_step(body: dict[str, Any], step: str) -> dict[str, Any] | None:
    return next((s for s in body["steps"] if s["step"] == step and s["status"] == "open"), None)


HUMAN_ONLY: dict[str, Any] = {
    "start": "ask",
    "steps": {
        "ask": {"kind": "human", "role": "operator", "outcomes": ["yes", "no"], "next": {"yes": "y", "no": "n"}},
        "y": {"kind": "end", "result": "said_yes"},
        "n": {"kind": "end", "result": "said_no"},
    },
}


async def test_an_unrunnable_definition_is_refused_with_every_problem(app_client: httpx.AsyncClient) -> None:
    definition = {
        "start": "ask",
        "steps": {
            "ask": {"kind": "human", "role": "astronaut", "outcomes": ["yes", "no"], "next": {"yes": "end"}},
            "orphan": {"kind": "timer", "wait_s": 1, "next": {"done": "orphan"}},
            "end": {"kind": "end"},
        },
    }
    response = await app_client.post("/processes/definitions", json={"name": unique("bad"), "definition": definition})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problems = response.json()["problems"]
    assert "step 'ask': outcome 'no' leads nowhere (no `next` for it)" in problems
    assert any(p.startswith("step 'ask': unknown role 'astronaut'") for p in problems)
    assert "step 'orphan': unreachable from the start" in problems
    # An unknown step kind (module) is refused by the schema, also with 422.
    unknown_kind = {"start": "a", "steps": {"a": {"kind": "teleport"}}}
    response = await app_client.post("/processes/definitions", json={"name": unique("bad"), "definition": unknown_kind})
    assert response.status_code == 422


async def test_instances_keep_the_version_they_started_with(app_client: httpx.AsyncClient) -> None:
    name = unique("versions")
    first = await define(app_client, name, HUMAN_ONLY)
    started = await app_client.post("/processes/instances", json={"definition": name})
    assert started.status_code == 201, started.text
    changed = {**HUMAN_ONLY, "steps": {**HUMAN_ONLY["steps"], "y": {"kind": "end", "result": "v2_yes"}}}
    second = await define(app_client, name, changed)
    assert (first["version"], second["version"]) == (1, 2)
    versions = (await app_client.get(f"/processes/definitions/{name}/versions")).json()
    assert [v["version"] for v in versions] == [1, 2]
    assert (await app_client.get(f"/processes/definitions/{name}")).json()["version"] == 2

    body = await instance(app_client, started.json()["id"])
    assert body["version"] == 1
    step = open_step(body, "ask")
    assert step is not None
    done = await app_client.post(
        f"/processes/instances/{body['id']}/steps/{step['id']}/complete", json={"outcome": "yes"}
    )
    assert done.status_code == 200, done.text
    assert (done.json()["status"], done.json()["result"]) == ("completed", "said_yes")


async def test_a_human_step_needs_its_role_and_completes_once(
    app_client: httpx.AsyncClient, asgi_app: Any, settings: Settings
) -> None:
    name = unique("roles")
    await define(app_client, name, HUMAN_ONLY)
    started = (await app_client.post("/processes/instances", json={"definition": name})).json()
    step = open_step(await instance(app_client, started["id"]), "ask")
    assert step is not None
    url = f"/processes/instances/{started['id']}/steps/{step['id']}/complete"
    transport = httpx.ASGITransport(app=asgi_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://swarm.test/api/v1") as client:
        engineer = headers(settings, Scope.PROCESSES_WORK, "role:engineer")
        operator = headers(settings, Scope.PROCESSES_WORK, "role:operator")
        assert (await client.post(url, json={"outcome": "yes"}, headers=engineer)).status_code == 403
        assert (
            await client.post(url, json={"outcome": "yes"}, headers=headers(settings, "role:operator"))
        ).status_code == 403
        work = await client.get("/processes/work", headers=operator)
        assert work.status_code == 200
        assert step["id"] in [s["id"] for s in work.json()]
        assert (await client.post(url, json={"outcome": "maybe"}, headers=operator)).status_code == 422
        # Five people press the button at once: one completion, four conflicts.
        answers = await asyncio.gather(*(client.post(url, json={"outcome": "no"}, headers=operator) for _ in range(5)))
    assert sorted(a.status_code for a in answers) == [200, 409, 409, 409, 409]
    body = await instance(app_client, started["id"])
    assert (body["status"], body["result"]) == ("completed", "said_no")
    completed = [h for h in body["history"] if h["type"] == "step.completed"]
    assert len(completed) == 1
    assert completed[0]["details"]["actor"] == "tests-person"


async def test_deadline_timer_parallel_join_and_subprocess(app_client: httpx.AsyncClient) -> None:
    child = unique("child")
    await define(
        app_client,
        child,
        {
            "start": "wait",
            "steps": {
                "wait": {"kind": "timer", "wait_s": 0.5, "next": {"done": "ok"}},
                "ok": {"kind": "end", "result": "completed"},
            },
        },
    )
    parent = unique("parent")
    await define(
        app_client,
        parent,
        {
            "start": "split",
            "steps": {
                "split": {"kind": "parallel", "branches": ["ask", "call"]},
                "ask": {
                    "kind": "human",
                    "role": "operator",
                    "outcomes": ["done", "late"],
                    "deadline_s": 1,
                    "on_deadline": "late",
                    "next": {"*": "join"},
                },
                "call": {
                    "kind": "subprocess",
                    "definition": child,
                    "input": {"from": "${input.who}"},
                    "next": {"completed": "join", "*": "broken"},
                },
                "join": {"kind": "join", "wait_for": "all", "next": {"done": "end"}},
                "end": {"kind": "end", "result": "both"},
                "broken": {"kind": "end", "result": "failed"},
            },
        },
    )
    started = (
        await app_client.post("/processes/instances", json={"definition": parent, "input": {"who": "me"}})
    ).json()
    body = await settled(app_client, started["id"], lambda b: b["status"] != "running")
    assert (body["status"], body["result"]) == ("completed", "both")
    assert body["data"]["steps"]["ask"] == {"deadline_passed": True, "outcome": "late"}
    call = next(s for s in body["steps"] if s["step"] == "call")
    assert call["outcome"] == "completed"
    child_body = await instance(app_client, call["child_id"])
    assert child_body["parent_id"] == started["id"]
    assert child_body["data"]["input"] == {"from": "me"}
    assert child_body["result"] == "completed"


async def test_predictive_maintenance_confirmed_end_to_end(
    app_client: httpx.AsyncClient,
    asgi_app: Any,
    enrol_device: EnrolDevice,
    settings: Settings,
    mailbox: Mailbox,
    sessions: Sessions,
) -> None:
    """The seed's example: the device reports state, a trigger starts the process, both criteria
    fire, the operator confirms through the API, the e-mails arrive, the technologist's step and
    a repair task on the device finish the instance."""
    name = unique("predictive-maintenance")
    await define(app_client, name, example(name)["definition"])
    trigger = await app_client.post(
        "/processes/triggers",
        json={
            "definition": name,
            "event": "state_match",
            "condition": "has(state.vibration_mm_s) && state.vibration_mm_s > 7.0",
            "input": {"vibration_limit": 7.0, "temperature_limit": 80.0},
        },
    )
    assert trigger.status_code == 201, trigger.text
    creds = await enrol_device("pm")
    device = make_device(settings, creds)
    repairs: list[dict[str, Any]] = []

    @device.task_handler("repair")
    async def repair(ctx: TaskContext) -> dict[str, Any]:
        repairs.append(dict(ctx.params))
        return {"replaced": "bearing"}

    transport = httpx.ASGITransport(app=asgi_app)
    async with running(device), httpx.AsyncClient(transport=transport, base_url="http://swarm.test/api/v1") as people:
        await device.report_state({"vibration_mm_s": 9.1, "bearing_temp_c": 95.0})
        found: list[dict[str, Any]] = []

        async def started() -> bool:
            listing = await app_client.get("/processes/instances", params={"device_id": creds.device_id})
            found[:] = listing.json()["items"]
            return bool(found)

        await eventually(started, within_s=WITHIN_S, every_s=0.2)
        instance_id = found[0]["id"]
        body = await settled(app_client, instance_id, lambda b: open_step(b, "operator_review"))
        assert body["data"]["steps"]["criteria"] == {"outcome": "fired"}
        await eventually(lambda: bool(mailbox.to("operator@plant.example", creds.device_id)), within_s=WITHIN_S)
        mail = mailbox.to("operator@plant.example", creds.device_id)[0]
        assert "Vibration 9.1 mm/s, bearing 95.0 C" in str(mail.get_payload())

        review = open_step(body, "operator_review")
        assert review is not None
        operator = headers(settings, Scope.PROCESSES_WORK, "role:operator")
        confirmed = await people.post(
            f"/processes/instances/{instance_id}/steps/{review['id']}/complete",
            json={"outcome": "confirmed", "output": {"note": "looks real"}},
            headers=operator,
        )
        assert confirmed.status_code == 200, confirmed.text
        await eventually(lambda: bool(mailbox.to("technologist@plant.example", creds.device_id)), within_s=WITHIN_S)
        # The repair task runs on the device while the technologist works.
        body = await settled(
            app_client,
            instance_id,
            lambda b: any(s["step"] == "repair_task" and s["status"] == "done" for s in b["steps"]),
        )
        assert repairs == [{"reason": "predicted defect", "vibration_mm_s": 9.1}]
        assert body["status"] == "running"
        technologist = headers(settings, Scope.PROCESSES_WORK, "role:technologist")
        work = (await people.get("/processes/work", headers=technologist)).json()
        step = next(s for s in work if s["instance_id"] == instance_id)
        done = await people.post(
            f"/processes/instances/{instance_id}/steps/{step['id']}/complete",
            json={"outcome": "done"},
            headers=technologist,
        )
        assert done.status_code == 200, done.text

    body = done.json()
    assert (body["status"], body["result"]) == ("completed", "repaired")
    assert body["data"]["steps"]["repair_task"]["result"] == {"replaced": "bearing"}
    assert body["data"]["steps"]["operator_review"] == {"note": "looks real", "outcome": "confirmed"}
    types = [h["type"] for h in body["history"]]
    assert types[0] == "process.started"
    assert types[-1] == "process.completed"
    # Nobody else was mailed about this device.
    assert not mailbox.to("engineer@plant.example", creds.device_id)
    # The process events are in the one event log.
    logged = await _events_of(sessions, instance_id)
    assert logged == types
    assert {"step.opened", "step.completed", "notify.queued", "step.arrived"} <= set(logged)


async def _events_of(sessions: Sessions, instance_id: str) -> list[str]:
    """Types of the instance's events as GET /events reads and frames them (the stream itself is
    tested in test_events.py with a real HTTP server)."""
    async with sessions() as session:
        rows = await event_log.events_after(session, 0, 100_000)
    events = [event_service.to_event(row) for row in rows]
    return [e.type for e in events if e.details and e.details.get("instance_id") == instance_id]


async def test_rejected_mails_wait_while_the_mail_server_is_down(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, mailbox: Mailbox, db: asyncpg.Connection
) -> None:
    name = unique("predictive-maintenance")
    await define(app_client, name, example(name)["definition"])
    creds = await enrol_device("pm")
    await db.execute(
        "UPDATE devices SET reported_state = $2::jsonb, reported_at = now() WHERE id = $1",
        creds.device_id,
        json.dumps({"vibration_mm_s": 12.0, "bearing_temp_c": 99.0}),
    )
    mailbox.stop()
    try:
        started = await app_client.post(
            "/processes/instances",
            json={
                "definition": name,
                "device_id": creds.device_id,
                "input": {"vibration_limit": 7, "temperature_limit": 80},
            },
        )
        assert started.status_code == 201, started.text
        instance_id = started.json()["id"]
        body = await settled(app_client, instance_id, lambda b: open_step(b, "operator_review"))
        review = open_step(body, "operator_review")
        assert review is not None
        rejected = await app_client.post(
            f"/processes/instances/{instance_id}/steps/{review['id']}/complete", json={"outcome": "rejected"}
        )
        assert rejected.status_code == 200, rejected.text
        assert open_step(rejected.json(), "engineer_review") is not None

        async def failed_twice() -> bool:
            attempts = await db.fetch(
                "SELECT attempts, sent_at FROM process_outbox WHERE instance_id = $1", uuid.UUID(instance_id)
            )
            return len(attempts) == 2 and all(a["attempts"] >= 2 and a["sent_at"] is None for a in attempts)

        await eventually(failed_twice, within_s=WITHIN_S, every_s=0.2)
    finally:
        mailbox.start()
    await eventually(lambda: bool(mailbox.to("engineer@plant.example", creds.device_id)), within_s=WITHIN_S)
    await eventually(lambda: bool(mailbox.to("operator@plant.example", creds.device_id)), within_s=WITHIN_S)
    assert len(mailbox.to("engineer@plant.example", creds.device_id)) == 1


async def test_a_trigger_on_a_task_final_status_starts_an_instance(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    name = unique("after-task")
    await define(app_client, name, HUMAN_ONLY)
    method = f"m{uuid.uuid4().hex[:8]}"
    trigger = await app_client.post(
        "/processes/triggers",
        json={"definition": name, "event": "task_final", "method": method, "statuses": ["canceled"], "input": {"k": 1}},
    )
    assert trigger.status_code == 201, trigger.text
    creds = await enrol_device("tf")
    task = (await app_client.post(f"/devices/{creds.device_id}/tasks", json={"method": method})).json()
    assert (await app_client.post(f"/tasks/{task['id']}/cancel")).status_code == 200
    found: list[dict[str, Any]] = []

    async def started() -> bool:
        found[:] = (await app_client.get("/processes/instances", params={"definition": name})).json()["items"]
        return bool(found)

    await eventually(started, within_s=WITHIN_S, every_s=0.2)
    assert [(i["device_id"], i["data"]["input"]) for i in found] == [(creds.device_id, {"k": 1})]
    # Pages of one: the cursor leads to the next (here: none, the only instance was on the first).
    page = (await app_client.get("/processes/instances", params={"definition": name, "limit": 1})).json()
    assert [i["id"] for i in page["items"]] == [found[0]["id"]]
    after = await app_client.get("/processes/instances", params={"definition": name, "cursor": page["next_cursor"]})
    assert after.json() == {"items": [], "next_cursor": None}


async def test_cancel(app_client: httpx.AsyncClient) -> None:
    name = unique("cancel")
    await define(app_client, name, HUMAN_ONLY)
    started = (await app_client.post("/processes/instances", json={"definition": name})).json()
    canceled = await app_client.post(f"/processes/instances/{started['id']}/cancel")
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled"
    assert [s["status"] for s in canceled.json()["steps"]] == ["canceled"]
    assert (await app_client.post(f"/processes/instances/{started['id']}/cancel")).status_code == 409
