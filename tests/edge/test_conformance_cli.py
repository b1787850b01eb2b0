"""`python -m app.cli conformance` as an operator runs it: through nginx, with a token, as a process."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from app.auth import Scope, mint_token
from app.settings import Settings
from tests.conftest import ROOT, STACK_DIR, EnrolDevice
from tests.external_device import device_process, paho_device


async def conformance(settings: Settings, edge_url: str, device_id: str, *rules: str) -> tuple[int, str]:
    token = mint_token(settings.auth, "tests", [Scope.TASKS_READ, Scope.TASKS_WRITE], 3600)
    command = [
        *(sys.executable, "-m", "app.cli", "conformance", "--device", device_id, "--within", "20"),
        *("--api", f"{edge_url}/api/v1", "--token", token, "--cacert", str(STACK_DIR / "pki" / "ca.crt")),
        *("--env-file", str(STACK_DIR / "app.env")),
        *(arg for rule in rules for arg in ("--rule", rule)),
    ]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), 300)
    assert process.returncode is not None
    return process.returncode, output.decode()


@pytest.mark.usefixtures("edge_app")
async def test_the_command_prints_the_report_and_its_verdict(
    enrol_device: EnrolDevice, settings: Settings, edge_url: str, tmp_path: Path
) -> None:
    creds = await enrol_device("cli")
    code, output = await conformance(settings, edge_url, creds.device_id, "notice-then-pull")
    assert code == 1, output
    assert "FAIL  connected" in output
    assert "0 broker connection(s)" in output

    async with device_process(paho_device(settings, creds), tmp_path / "paho.log"):
        code, output = await conformance(settings, edge_url, creds.device_id, "notice-then-pull", "cancel")
    assert code == 0, output
    assert "PASS  notice-then-pull" in output
    assert "PASS  cancel" in output
    assert "3 of 3 rules passed or skipped; 0 failed" in output
