"""Run a device program (a reference device, the simulator, a deliberately broken device) as a process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from app.settings import Settings
from tests.conftest import ROOT, DeviceCredentials

EXAMPLES = ROOT / "examples" / "devices"


def paho_device(settings: Settings, creds: DeviceCredentials) -> list[str]:
    return [
        sys.executable,
        str(EXAMPLES / "paho_device.py"),
        *("--id", creds.device_id, "--host", settings.broker.mqtt_host, "--port", str(settings.broker.mqtt_port)),
        *("--ca", str(creds.ca_file), "--cert", str(creds.cert_file), "--key", str(creds.key_file)),
    ]


def shell_device(settings: Settings, creds: DeviceCredentials) -> list[str]:
    broker = settings.broker
    files = [str(creds.ca_file), str(creds.cert_file), str(creds.key_file)]
    return ["bash", str(EXAMPLES / "device.sh"), creds.device_id, broker.mqtt_host, str(broker.mqtt_port), *files]


@contextlib.asynccontextmanager
async def device_process(command: Sequence[str], log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """The device runs in its own process group (a shell device's mosquitto_sub ends with it)."""
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=output, stderr=asyncio.subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
