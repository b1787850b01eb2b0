"""The SDK's simulator (`swarm_device.simulator`, asyncio) as children of the harness: one process,
or several that split the fleet when one core cannot drive all of its TLS connections."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

from app.settings import Settings
from bench.env import ROOT, die_with_harness, python_command, stop_process
from bench.fleet import Fleet

_STATUS = re.compile(rb"connected (\d+) ready (\d+).* failures (\d+)")
_FLOODED = re.compile(rb"flooded (\d+)")
# A simulator says goodbye to thousands of connections on SIGTERM: give it time before SIGKILL.
STOP_TIMEOUT_S = 60.0


class Simulator:
    """Counts from the simulators' own status lines: devices connected (subscribed) and ready
    (hello answered), summed over the processes."""

    def __init__(self, processes: list[asyncio.subprocess.Process]) -> None:
        self.processes = processes
        self._counts = [(0, 0, 0)] * len(processes)
        self._flooded = [0] * len(processes)
        self._readers = [asyncio.create_task(self._read(i)) for i in range(len(processes))]

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    @property
    def connected(self) -> int:
        return sum(counts[0] for counts in self._counts)

    @property
    def ready(self) -> int:
        return sum(counts[1] for counts in self._counts)

    @property
    def connect_failures(self) -> int:
        """Connection attempts that did not get as far as subscribing (refused, timed out)."""
        return sum(counts[2] for counts in self._counts)

    @property
    def flooded(self) -> int:
        """Requests sent by flooding devices (`--flood`) so far."""
        return sum(self._flooded)

    def check_running(self) -> None:
        if any(process.returncode is not None for process in self.processes):
            raise RuntimeError("a simulator process exited")

    async def _read(self, index: int) -> None:
        stdout = self.processes[index].stdout
        assert stdout is not None
        async for line in stdout:
            if match := _STATUS.search(line):
                self._counts[index] = (int(match[1]), int(match[2]), int(match[3]))
            if match := _FLOODED.search(line):
                self._flooded[index] = int(match[1])

    async def stop(self) -> None:
        await asyncio.gather(*(stop_process(process, STOP_TIMEOUT_S) for process in self.processes))
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


@contextlib.asynccontextmanager
async def simulating(
    settings: Settings,
    fleet: Fleet,
    count: int,
    connect_rate: float,
    log_file: Path,
    *,
    processes: int = 1,
    no_hello: bool = False,
    first: int = 1,
    flood: str | None = None,
    ask_next: bool = True,
) -> AsyncIterator[Simulator]:
    """Devices `<prefix><first>..` (`count` of them) of the fleet running `echo` tasks until the
    block ends, split over `processes` simulator processes that share the connect rate;
    `no_hello`: devices that only connect (ready once subscribed); `flood`: misbehaving devices
    that send this method's requests as fast as they can; `ask_next=False`: devices that report
    results as older SDKs did."""
    processes = max(1, min(processes, count))
    started: list[asyncio.subprocess.Process] = []
    try:
        with log_file.open("ab") as log:
            for index in range(processes):
                start = first + count * index // processes
                last = first - 1 + count * (index + 1) // processes
                args = python_command(
                    "swarm_device.simulator",
                    f"--host={settings.broker.mqtt_host}",
                    f"--port={settings.broker.mqtt_port}",
                    f"--ca={settings.pki.ca_cert_file}",
                    f"--cert-dir={fleet.cert_dir}",
                    f"--start={start}",
                    f"--count={last - start + 1}",
                    f"--prefix={fleet.prefix}",
                    f"--connect-rate={connect_rate / processes}",
                    "--status-interval=1",
                    *(["--no-hello"] if no_hello else []),
                    *([] if ask_next else ["--no-ask-next"]),
                    *([f"--flood={flood}"] if flood else []),
                )
                started.append(
                    await asyncio.create_subprocess_exec(
                        *args,
                        cwd=ROOT,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=log,
                        start_new_session=True,
                        preexec_fn=die_with_harness,
                    )
                )
        simulator = Simulator(started)
    except BaseException:
        await asyncio.gather(*(stop_process(process, STOP_TIMEOUT_S) for process in started))
        raise
    try:
        yield simulator
    finally:
        await simulator.stop()
