"""The reference devices of examples/devices (plain paho-mqtt, shell with mosquitto clients) against the stack."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app.settings import Settings
from tests.conftest import DeviceCredentials, EnrolDevice
from tests.external_device import device_process, paho_device, shell_device

DEVICES: dict[str, Callable[[Settings, DeviceCredentials], list[str]]] = {"paho": paho_device, "shell": shell_device}


async def create(client: httpx.AsyncClient, device_id: str, method: str, params: dict[str, object]) -> str:
    response = await client.post(f"/devices/{device_id}/tasks", json={"method": method, "params": params})
    assert response.status_code == 201, response.text
    task_id: str = response.json()["id"]
    return task_id


def output(log: Path) -> str:
    return log.read_text(errors="replace")


async def final(client: httpx.AsyncClient, task_id: str, log: Path) -> dict[str, object]:
    response = await client.get(f"/tasks/{task_id}", params={"wait": 60})
    body: dict[str, object] = response.json()
    assert body["status"] not in ("queued", "sent", "in_progress"), output(log)
    return body


@pytest.mark.parametrize("kind", list(DEVICES))
async def test_the_reference_device_completes_tasks(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings, tmp_path: Path, kind: str
) -> None:
    creds = await enrol_device(kind)
    dev = creds.device_id
    waiting = await create(app_client, dev, "echo", {"queued": "before the device connected"})
    log = tmp_path / f"{kind}.log"
    async with device_process(DEVICES[kind](settings, creds), log) as process:
        done = await final(app_client, waiting, log)
        assert done["status"] == "succeeded"
        assert done["result"] == {"queued": "before the device connected"}

        noticed = await create(app_client, dev, "echo", {"n": 2})
        slow = await create(app_client, dev, "sleep", {"seconds": 1})
        unknown = await create(app_client, dev, "format-disk", {})
        assert (await final(app_client, noticed, log))["result"] == {"n": 2}
        assert (await final(app_client, slow, log))["status"] == "succeeded"
        assert (await final(app_client, unknown, log))["status"] == "rejected"
        assert process.returncode is None, output(log)
    device = (await app_client.get(f"/devices/{dev}")).json()
    assert device["firmware"] == f"{kind}-example-1"
