"""The SDK's simulator (`swarm_device.simulator`, asyncio, one process) as a child of the harness."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from app.settings import Settings
from bench.env import ROOT, python_command
from bench.fleet import Fleet

_STATUS = re.compile(rb"connected (\d+) ready (\d+)")


class Simulator:
    """Counts from the simulator's own status lines: devices connected (subscribed) and ready (hello answered)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.connected = 0
        self.ready = 0
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            if match := _STATUS.search(line):
                self.connected, self.ready = int(match[1]), int(match[2])

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 60)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def simulating(
    settings: Settings, fleet: Fleet, count: int, connect_rate: float, log_file: Path
) -> AsyncIterator[Simulator]:
    """Devices `<prefix>1..<prefix><count>` of the fleet running `echo` tasks until the block ends."""
    args = python_command(
        "swarm_device.simulator",
        f"--host={settings.broker.mqtt_host}",
        f"--port={settings.broker.mqtt_port}",
        f"--ca={settings.pki.ca_cert_file}",
        f"--cert-dir={fleet.cert_dir}",
        f"--count={count}",
        f"--prefix={fleet.prefix}",
        f"--connect-rate={connect_rate}",
        "--protocol=3.1.1",
        "--status-interval=1",
    )
    with log_file.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=log, start_new_session=True
        )
    simulator = Simulator(process)
    try:
        yield simulator
    finally:
        await simulator.stop()
