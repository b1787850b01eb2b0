"""Configuration round trip, metrics and the AsyncAPI document, with the app and a real device."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.settings import Settings
from swarm_device.client import ProtocolPreference
from tests.conftest import EnrolDevice
from tests.e2e.test_events import subscribe_once
from tests.e2e.test_sdk_device import MQTT_VERSIONS, make_device, running, wait_final

ROOT = Path(__file__).resolve().parents[2]


async def _config_when(client: httpx.AsyncClient, device_id: str, reported: dict[str, Any]) -> dict[str, Any]:
    for _ in range(100):
        body: dict[str, Any] = (await client.get(f"/devices/{device_id}/config")).json()
        if body["reported"] == reported:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"device never reported {reported}: {body}")


@MQTT_VERSIONS
async def test_config_round_trip(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings, mqtt_version: ProtocolPreference
) -> None:
    creds = await enrol_device("cfg")
    # Set while the device is offline: the retained message waits for it.
    first = {"interval_s": 30, "mode": "eco"}
    stored = await app_client.put(f"/devices/{creds.device_id}/config", json=first)
    assert stored.status_code == 200, stored.text
    assert stored.json() | {"desired_at": None} == {
        "device_id": creds.device_id,
        "desired": first,
        "desired_at": None,
        "reported": None,
        "reported_at": None,
        "in_sync": False,
        "published": True,
    }

    async with running(make_device(settings, creds, mqtt_version)) as device:
        synced = await _config_when(app_client, creds.device_id, first)
        assert synced["in_sync"] is True
        assert device.current_config == first

        second = {"interval_s": 5, "mode": "turbo"}
        changed = await app_client.put(f"/devices/{creds.device_id}/config", json=second)
        assert changed.json()["desired"] == second
        synced = await _config_when(app_client, creds.device_id, second)
        assert synced["in_sync"] is True
        assert device.current_config == second

    missing = await app_client.get("/devices/no-such-device/config")
    assert missing.status_code == 404


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("http://swarm.test/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return _samples(response.text)


async def test_metrics_change_as_tasks_flow(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings
) -> None:
    creds = await enrol_device("met")
    before = await _scrape(app_client)
    succeeded = ("swarm_tasks", (("status", "succeeded"),))
    to_sent = ("swarm_task_created_to_sent_seconds_count", ())
    to_started = ("swarm_task_created_to_in_progress_seconds_count", ())
    to_final = ("swarm_task_created_to_final_seconds_count", (("status", "succeeded"),))
    connected = ("swarm_devices_connected", ())

    # Every transition exactly once: SENT while the device is offline, then it connects and pulls.
    await subscribe_once(settings, creds)
    created = await app_client.post(f"/devices/{creds.device_id}/tasks", json={"method": "echo"})
    for _ in range(200):
        if (status := (await app_client.get(f"/tasks/{created.json()['id']}")).json()["status"]) == "sent":
            break
        await asyncio.sleep(0.1)
    assert status == "sent"
    async with running(make_device(settings, creds)):
        assert (await wait_final(app_client, created.json()["id"]))["status"] == "succeeded"
        for _ in range(50):  # presence arrives through the broker's event exchange
            during = await _scrape(app_client)
            if (await app_client.get(f"/devices/{creds.device_id}")).json()["online"]:
                break
            await asyncio.sleep(0.1)
    after = await _scrape(app_client)

    # Other tests' devices come and go meanwhile: this one at least is counted.
    assert during[connected] >= 1
    assert after[succeeded] == before[succeeded] + 1
    assert after[to_sent] == before[to_sent] + 1
    assert after[to_started] == before[to_started] + 1
    assert after[to_final] == before.get(to_final, 0) + 1
    # Exported even before the first error (no samples yet, but declared).
    text = (await app_client.get("http://swarm.test/metrics")).text
    assert "# TYPE swarm_consumer_errors_total counter" in text
    assert "# TYPE swarm_dead_lettered_total counter" in text


def design_topics() -> set[str]:
    """Every topic of DESIGN.md section 4: its topic table, and one up-topic per method."""
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    section = design.split("## 4.")[1].split("\n## ")[0]
    topics = set(re.findall(r"^\| `(dev/\{id\}/[^`]+)`", section, re.MULTILINE))
    methods = re.findall(r"^\| `((?!dev/)[a-z/_{}]+)` \|", section, re.MULTILINE)
    topics.discard("dev/{id}/up/rpc/{method}")
    topics |= {f"dev/{{id}}/up/rpc/{m}" for m in methods}
    return {t.replace("{id}", "{device_id}") for t in topics}


async def test_asyncapi_lists_every_topic_of_the_design(app_client: httpx.AsyncClient) -> None:
    expected = design_topics()
    assert len(expected) == 8, expected  # 3 down-topics and 5 methods
    response = await app_client.get("http://swarm.test/asyncapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["asyncapi"].startswith("3.")
    listed = {name.replace(".", "/") for name in document["operations"]}
    assert expected <= listed, expected - listed
    page = await app_client.get("http://swarm.test/asyncapi")
    assert page.status_code == 200
    assert "dev/{device_id}/up/rpc/hello" in page.text


async def test_the_mqtt_view_documents_what_the_core_consumes(app_client: httpx.AsyncClient) -> None:
    """/asyncapi/device.json is built from protocol.py; the core's view from its subscribers: same methods."""
    device_view = (await app_client.get("http://swarm.test/asyncapi/device.json")).json()
    core_view = (await app_client.get("http://swarm.test/asyncapi.json")).json()
    consumed = {name.replace(".", "/") for name in core_view["operations"]}
    consumed = {name for name in consumed if name.startswith("dev/{device_id}/up/rpc/")}
    sent = {
        device_view["channels"][op["channel"]["$ref"].split("/")[-1]]["address"]
        for op in device_view["operations"].values()
        if op["action"] == "send"
    }
    assert sent == consumed
    assert len(sent) == 5
    page = await app_client.get("http://swarm.test/asyncapi/device")
    assert page.status_code == 200
    assert "dev/{device_id}/down/config" in page.text
