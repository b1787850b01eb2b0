"""What an outside fuzzer and foreign devices found (issue 12), with the real app, PostgreSQL,
RabbitMQ and TLS MQTT clients: JSON the core could not store or publish is refused up front,
device params with fields a method does not define are refused naming them, `hello` carries the
desired configuration, and a periodic job leaves a row it fails on aside and serves the others.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import httpx
import pytest

from app.db import Sessions
from app.devices import config
from app.devices import service as devices
from app.devices.broker_admin import BrokerAdmin
from app.devices.config import CONFIGS, RetainedPublisher
from app.errors import PROBLEM_JSON, FailedRows
from app.settings import Settings
from swarm_device import protocol
from tests.conftest import EnrolDevice
from tests.e2e.test_sdk_device import make_device, running
from tests.polling import eventually
from tests.raw_device import raw_device

# Raw JSON bodies Python's parser takes and PostgreSQL's jsonb or orjson do not: (value, message).
UNSTORABLE: list[tuple[bytes, str]] = [
    (b"18446744073709551616", "integers must be within [-9223372036854775808, 18446744073709551615]"),
    (b"-9223372036854775809", "integers must be within"),
    (b"1.5e19", "within +-1e+19"),
    (b"NaN", "must be finite"),
    (b"Infinity", "must be finite"),
    (b"1e400", "must be finite"),
    (b'"\\ud800 alone"', "lone surrogates"),
    (b'"nul \\u0000 inside"', "U+0000"),
]


def _messages(response: httpx.Response) -> str:
    body = response.json()
    return " ".join(e["msg"] for e in body.get("errors", []))


@pytest.mark.parametrize(("value", "message"), UNSTORABLE, ids=[v.decode() for v, _ in UNSTORABLE])
async def test_json_the_core_cannot_store_is_refused_with_422_and_nothing_is_stored(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, value: bytes, message: str
) -> None:
    creds = await enrol_device("odd")
    headers = {"Content-Type": "application/json"}
    for path, body in [
        (f"/devices/{creds.device_id}/tasks", b'{"method": "m", "params": {"deep": [1, {"v": ' + value + b"}]}}"),
        (
            "/tasks/batch",
            b'{"method": "m", "device_ids": ["' + creds.device_id.encode() + b'"], "params": {"v": ' + value + b"}}",
        ),
    ]:
        refused = await app_client.post(path, content=body, headers=headers)
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"] == PROBLEM_JSON
        assert message in _messages(refused), refused.text
    refused = await app_client.put(
        f"/devices/{creds.device_id}/config", content=b'{"v": ' + value + b"}", headers=headers
    )
    assert refused.status_code == 422, refused.text
    assert message in _messages(refused), refused.text
    # Never stored, so nothing later fails on it.
    assert (await app_client.get("/tasks", params={"device_id": creds.device_id})).json()["items"] == []
    assert (await app_client.get(f"/devices/{creds.device_id}/config")).json()["desired"] is None
    # The largest storable values are taken and come back as they were sent.
    edge = {"max": 2**64 - 1, "min": -(2**63), "float": 1e19, "fraction": -0.5, "text": "\U0001f600"}
    task = await app_client.post(f"/devices/{creds.device_id}/tasks", json={"method": "m", "params": edge})
    assert task.status_code == 201, task.text
    assert (await app_client.get(f"/tasks/{task.json()['id']}")).json()["params"] == edge


async def test_a_key_that_is_itself_unstorable_gives_a_readable_422(app_client: httpx.AsyncClient) -> None:
    body = b'{"\\ud800": 18446744073709551616}'
    refused = await app_client.put("/devices/anyone/config", content=body, headers={"Content-Type": "application/json"})
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"] == PROBLEM_JSON


async def test_device_params_with_fields_the_method_does_not_define_are_refused_naming_them(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds = await enrol_device("extra")
    async with raw_device(settings.broker.mqtt_host, settings.broker.mqtt_port, creds) as dev:
        # The foreign device of the report: `state` at the top level instead of under `reported`.
        reply = await dev.call(protocol.METHOD_STATE, {"state": {"mode": "eco"}})
        assert reply["error"]["code"] == "invalid", reply
        assert "state" in reply["error"]["message"], reply
        reply = await dev.call(protocol.METHOD_HELLO, {"firmware": "1", "colour": "red", "size": 3})
        assert reply["error"]["code"] == "invalid", reply
        assert "colour" in reply["error"]["message"], reply
        assert "size" in reply["error"]["message"], reply
        reply = await dev.call(protocol.METHOD_TASKS_NEXT, {"limit": 5})
        assert reply["error"]["code"] == "invalid", reply
        assert "limit" in reply["error"]["message"], reply
        # Nothing was stored by the refused `state`; the defined fields still work.
        assert (await app_client.get(f"/devices/{creds.device_id}/config")).json()["reported"] is None
        assert "result" in await dev.call(protocol.METHOD_STATE, {"reported": {"mode": "eco"}})
    assert (await app_client.get(f"/devices/{creds.device_id}/config")).json()["reported"] == {"mode": "eco"}


async def test_hello_carries_the_desired_configuration_and_the_sdk_applies_it_without_a_retained_message(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds = await enrol_device("hello-config")
    desired = {"mode": "eco", "interval_s": 30}
    assert (await app_client.put(f"/devices/{creds.device_id}/config", json=desired)).status_code == 200
    # Take the retained message away (an empty retained publish clears it), as a broker that
    # lost it or a wildcard subscription on RabbitMQ 3.x would: only `hello` can tell the device.
    await RetainedPublisher(settings.broker).publish([(protocol.config_topic(creds.device_id), b"")])
    async with raw_device(settings.broker.mqtt_host, settings.broker.mqtt_port, creds) as dev:
        assert (await dev.result(protocol.METHOD_HELLO, {"firmware": "1"}))["desired_config"] == desired
    async with running(make_device(settings, creds)) as device:
        await eventually(lambda: device.current_config == desired, within_s=20)

        async def reported() -> bool:
            body = (await app_client.get(f"/devices/{creds.device_id}/config")).json()
            return bool(body["in_sync"])

        await eventually(reported, within_s=20)


async def _bad_config_row(db: asyncpg.Connection, device_id: str) -> None:
    # What an earlier version let in: an integer orjson cannot write, stored and due.
    await db.execute(
        """UPDATE devices SET desired_config = '{"huge": 123456789012345678901234567890}'::jsonb,
           desired_at = now(), config_due_at = now() - interval '1 minute' WHERE id = $1""",
        device_id,
    )


async def test_a_configuration_that_cannot_be_published_does_not_hold_back_the_others(
    app_client: httpx.AsyncClient,
    enrol_device: EnrolDevice,
    settings: Settings,
    sessions: Sessions,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = await enrol_device("bad-config")
    good = await enrol_device("good-config")
    await _bad_config_row(db, bad.device_id)
    await db.execute(
        """UPDATE devices SET desired_config = '{"ok": 1}'::jsonb, desired_at = now(),
           config_due_at = now() - interval '1 minute' WHERE id = $1""",
        good.device_id,
    )
    failed = FailedRows()
    publisher = RetainedPublisher(settings.broker)
    with caplog.at_level(logging.ERROR, logger="app.errors"):
        for _ in range(3):
            await config.publish_due(sessions, publisher, failed)
    # The good one was published (by these rounds or the app's own job), the bad one stays due,
    # left out of later rounds and logged once by this FailedRows however often it ran (the
    # app's own job, with its own, may have logged it once too).
    assert (await app_client.get(f"/devices/{good.device_id}/config")).json()["published"] is True
    assert (await app_client.get(f"/devices/{bad.device_id}/config")).json()["published"] is False
    assert [device_id for device_id, _ in failed.of(CONFIGS)] == [bad.device_id]
    logged = [r for r in caplog.records if bad.device_id in r.getMessage()]
    assert 1 <= len(logged) <= 2, [r.getMessage() for r in logged]
    # A real device of the good row has its configuration.
    async with running(make_device(settings, good)) as device:
        await eventually(lambda: device.current_config == {"ok": 1}, within_s=20)
    # Fixed through the API: published at once.
    fixed = await app_client.put(f"/devices/{bad.device_id}/config", json={"huge": "1e29"})
    assert fixed.json()["published"] is True


@pytest.fixture
async def refuse_poison(db: asyncpg.Connection) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Arms a test-only trigger: from then on the database refuses what the deadline and expiry
    jobs do (requeue, time out, expire) to tasks whose method is `poison`, as it would to a row a
    job cannot change."""

    async def arm() -> None:
        await db.execute(
            """CREATE FUNCTION test_refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN RAISE EXCEPTION 'poison row %', OLD.id; END $$;
               CREATE TRIGGER test_refuse_poison BEFORE UPDATE ON tasks FOR EACH ROW
               WHEN (OLD.method = 'poison' AND NEW.status <> OLD.status
                     AND NEW.status IN ('queued', 'timed_out', 'expired')) EXECUTE FUNCTION test_refuse_poison();"""
        )

    yield arm
    await db.execute(
        "DROP TRIGGER IF EXISTS test_refuse_poison ON tasks; DROP FUNCTION IF EXISTS test_refuse_poison();"
    )


async def test_deadlines_and_expiry_go_on_past_a_row_they_cannot_change(
    app_client: httpx.AsyncClient,
    enrol_device: EnrolDevice,
    db: asyncpg.Connection,
    refuse_poison: Callable[[], Awaitable[None]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The app's own jobs (every 0.5 s in the tests) with one row each that they cannot change."""
    # One in-progress task per device: the two overdue ones on two devices.
    poisoned, healthy = await enrol_device("poison"), await enrol_device("healthy")
    ids: dict[str, str] = {}
    for name, device, method in [
        ("poison_overdue", poisoned, "poison"),
        ("overdue", healthy, "m"),
        ("poison_expired", poisoned, "poison"),
        ("expired", healthy, "m"),
    ]:
        created = await app_client.post(f"/devices/{device.device_id}/tasks", json={"method": method})
        ids[name] = created.json()["id"]
    with caplog.at_level(logging.ERROR, logger="app.errors"):
        # Past the deadline in progress / past the expiry while queued, straight in the database,
        # in one transaction (the jobs see both at once), then the poison rows become unchangeable.
        async with db.transaction():
            await db.execute(
                """UPDATE tasks SET status = 'in_progress', attempt = 1, started_at = now(),
                   deadline_at = now() - interval '1 minute' WHERE id = ANY($1::uuid[])""",
                [uuid.UUID(ids["poison_overdue"]), uuid.UUID(ids["overdue"])],
            )
            await db.execute(
                "UPDATE tasks SET expires_at = now() - interval '1 minute' WHERE id = ANY($1::uuid[])",
                [uuid.UUID(ids["poison_expired"]), uuid.UUID(ids["expired"])],
            )
            await refuse_poison()

        async def status(name: str) -> str:
            return str((await app_client.get(f"/tasks/{ids[name]}")).json()["status"])

        async def others_done() -> bool:
            return await status("overdue") in {"queued", "sent"} and await status("expired") == "expired"

        await eventually(others_done, within_s=20)
        # Several more rounds of both jobs.
        await asyncio.sleep(3)
    assert await status("poison_overdue") == "in_progress"
    assert await status("poison_expired") in {"queued", "sent"}
    for name in ("poison_overdue", "poison_expired"):
        logged = [r for r in caplog.records if ids[name] in r.getMessage()]
        assert len(logged) == 1, [r.getMessage() for r in logged]


async def test_broker_reconciliation_goes_on_past_a_device_it_cannot_provision(
    enrol_device: EnrolDevice, settings: Settings, sessions: Sessions, db: asyncpg.Connection
) -> None:
    lost = await enrol_device("lost-user")
    # A row the API would never write: an id the broker cannot take as a user name.
    bad_id = f"bad id {uuid.uuid4().hex[:8]}"
    await db.execute("INSERT INTO devices (id) VALUES ($1)", bad_id)
    admin = BrokerAdmin.from_settings(settings.broker)
    try:
        await admin.deprovision_device(lost.device_id)
        failed = FailedRows()
        for _ in range(2):
            await devices.reconcile_broker_users(sessions, admin, failed)
        assert await admin.device_provisioned(lost.device_id)
        assert failed.of(devices.BROKER_USERS) == [bad_id]
    finally:
        await admin.aclose()
        # Out of the way of later tests (devices are never deleted).
        await db.execute("UPDATE devices SET revoked_at = now() WHERE id = $1", bad_id)
