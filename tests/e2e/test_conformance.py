"""The conformance kit against the SDK's simulator (every rule passes) and broken devices (each fails its rule)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import pytest

from app.conformance import kit
from app.settings import Settings
from tests.broken_device import FLAWS, BrokenDevice, Flaw
from tests.conftest import EnrolDevice
from tests.external_device import device_process, paho_device


def verdicts(results: list[kit.RuleResult]) -> dict[str, bool | None]:
    return {result.rule: result.passed for result in results}


async def test_the_simulator_passes_every_rule(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings, tmp_path: Path
) -> None:
    creds = await enrol_device("sim")
    broker = settings.broker
    command = [
        sys.executable,
        *("-m", "swarm_device.simulator", "--device", creds.device_id, "--cert-dir", str(tmp_path)),
        *("--host", broker.mqtt_host, "--port", str(broker.mqtt_port), "--ca", str(creds.ca_file)),
        *("--protocol", "3.1.1", "--request-timeout", "5", "--connect-rate", "0"),
    ]
    async with device_process(command, tmp_path / "sim.log"):
        results = await kit.check_device(broker, app_client, creds.device_id)
    text = kit.report(creds.device_id, results)
    print(text)
    assert verdicts(results) == {rule: rule != "broker-restart" or None for rule in kit.RULES}, text
    assert "PASS  cancel:" in text
    assert "SKIP  broker-restart:" in text


async def test_the_paho_reference_device_passes_every_rule(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings, tmp_path: Path
) -> None:
    creds = await enrol_device("paho")
    async with device_process(paho_device(settings, creds), tmp_path / "paho.log"):
        results = await kit.check_device(settings.broker, app_client, creds.device_id)
    text = kit.report(creds.device_id, results)
    print(text)
    assert verdicts(results) == {rule: rule != "broker-restart" or None for rule in kit.RULES}, text


@pytest.mark.parametrize("flaw", list(FLAWS))
async def test_a_broken_device_fails_the_rule_it_breaks(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings, flaw: Flaw
) -> None:
    creds = await enrol_device("broken")
    broken_rule = FLAWS[flaw]
    # A rule the flaw does not touch passes in the same run: the kit tells one failure from another.
    control = "pull-on-connect" if broken_rule == "notice-then-pull" else "notice-then-pull"
    async with BrokenDevice(settings, creds, flaw) as device:
        await asyncio.wait_for(device.ready.wait(), 30)
        results = await kit.check_device(settings.broker, app_client, device.device_id, [broken_rule, control])
    text = kit.report(creds.device_id, results)
    print(text)
    assert verdicts(results) == {"connected": True, control: True, broken_rule: False}, text
