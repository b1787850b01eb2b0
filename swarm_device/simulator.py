"""Simulated devices: many `DeviceClient`s in one asyncio process.

    python -m swarm_device.simulator --host localhost --port 35883 --ca ca.crt \\
        --cert-dir certs/ --count 100 --prefix dev- --work-ms 50

Each device `X` uses `<cert-dir>/X.crt` and `<cert-dir>/X.key`. Built-in task methods: `echo`
(returns its params), `sleep` (params.seconds, optional params.progress_interval), `fail`
(fails), `reboot` (returns {"rebooted": true}); any other method is rejected by the SDK.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import resource
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from swarm_device.client import DeviceClient, ProtocolPreference
from swarm_device.protocol import DEVICE_ID_RE, request_topic
from swarm_device.rpc import RpcCallError, RpcTimeoutError, encode_request, new_request_id
from swarm_device.stats import DeviceStats
from swarm_device.tasks import TaskContext, TaskHandler, TaskRejected

logger = logging.getLogger("swarm_device.simulator")

# Publishes of a flooding device awaited together: enough to keep its socket's buffer full.
FLOOD_WINDOW = 64


class SimulatedFailure(Exception):
    """The failure a simulated task raises (on `fail`, or by `--fail-rate` chance)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="swarm-device-sim",
        description="Run simulated Swarm Core devices in one process.",
    )
    parser.add_argument("--host", default="localhost", help="MQTT broker host")
    parser.add_argument("--port", type=int, default=8883, help="MQTTS port")
    parser.add_argument("--ca", required=True, type=Path, help="CA certificate file")
    parser.add_argument(
        "--cert-dir",
        required=True,
        type=Path,
        help="folder with <device_id>.crt and <device_id>.key for every device",
    )
    parser.add_argument("--count", type=int, default=1, help="number of devices")
    parser.add_argument("--prefix", default="dev-", help="device id prefix")
    parser.add_argument("--start", type=int, default=1, help="first device number")
    parser.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="ID",
        help="a device id (repeatable); replaces --count/--prefix/--start",
    )
    parser.add_argument("--work-ms", type=float, default=0.0, help="simulated duration of a task")
    parser.add_argument(
        "--fail-rate",
        type=float,
        default=0.0,
        help="probability (0..1) that a task fails anyway",
    )
    parser.add_argument(
        "--protocol",
        choices=("5", "3.1.1"),
        default="5",
        help="MQTT version",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="stop after S seconds (default: never)",
    )
    parser.add_argument(
        "--connect-rate",
        type=float,
        default=100.0,
        help="devices started per second (0: all at once)",
    )
    parser.add_argument(
        "--status-interval",
        type=float,
        default=5.0,
        help="seconds between status lines",
    )
    parser.add_argument(
        "--connect-threads",
        type=int,
        default=32,
        help="threads for blocking TLS connects (aiomqtt runs connect() in the default executor)",
    )
    parser.add_argument("--request-timeout", type=float, default=10.0, help="first RPC reply timeout")
    parser.add_argument(
        "--no-hello",
        action="store_true",
        help="connect and subscribe only: no hello, no tasks/next (the broker's cost of connections alone)",
    )
    parser.add_argument(
        "--flood",
        default=None,
        metavar="METHOD",
        help="play a misbehaving device: after hello, send METHOD requests (e.g. tasks/next) as fast as the "
        "connection takes them, QoS 0, never waiting for a reply",
    )
    parser.add_argument(
        "--no-verify-hostname",
        action="store_true",
        help="do not check the broker certificate's host name",
    )
    parser.add_argument(
        "--no-ask-next",
        action="store_true",
        help="report results without `next` (as older SDKs: a tasks/next after every task)",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level")
    args = parser.parse_args(argv)
    if args.count < 1 and not args.device:
        parser.error("--count must be >= 1")
    if not 0 <= args.fail_rate <= 1:
        parser.error("--fail-rate must be within [0, 1]")
    if args.connect_threads < 1:
        parser.error("--connect-threads must be >= 1")
    if args.connect_rate < 0 or args.work_ms < 0:
        parser.error("--connect-rate and --work-ms must not be negative")
    return args


def device_ids(args: argparse.Namespace) -> list[str]:
    """The simulated device ids: `--device` ones, else prefix + start..start+count-1."""
    ids: list[str] = (
        list(args.device) if args.device else [f"{args.prefix}{n}" for n in range(args.start, args.start + args.count)]
    )
    bad = [device_id for device_id in ids if not DEVICE_ID_RE.match(device_id)]
    if bad:
        raise SystemExit(f"invalid device id(s): {', '.join(bad[:5])}")
    return ids


def build_handlers(work_s: float, fail_rate: float, rng: random.Random) -> dict[str, TaskHandler]:
    """The built-in task handlers of a simulated device."""

    async def work() -> None:
        if work_s > 0:
            await asyncio.sleep(work_s)
        if fail_rate > 0 and rng.random() < fail_rate:
            raise SimulatedFailure("simulated failure (--fail-rate)")

    async def echo(context: TaskContext) -> dict[str, Any]:
        await work()
        return context.params

    async def sleep(context: TaskContext) -> dict[str, Any]:
        seconds = context.params.get("seconds", 0)
        interval = context.params.get("progress_interval")
        if not isinstance(seconds, int | float) or seconds < 0:
            raise TaskRejected("params.seconds must be a non-negative number")
        if interval is not None and (not isinstance(interval, int | float) or interval <= 0):
            raise TaskRejected("params.progress_interval must be a positive number")
        if interval is None:
            await asyncio.sleep(seconds)
        else:
            started = time.monotonic()
            elapsed = 0.0
            while elapsed < seconds:
                await asyncio.sleep(min(interval, seconds - elapsed))
                elapsed = time.monotonic() - started
                if elapsed < seconds:
                    # Progress is best effort: a lost report must not fail the task.
                    with contextlib.suppress(RpcCallError, RpcTimeoutError):
                        await context.progress({"elapsed": round(elapsed, 3)})
        await work()
        return {"slept": seconds}

    async def fail(context: TaskContext) -> dict[str, Any]:
        await work()
        raise SimulatedFailure(str(context.params.get("message", "failed on request")))

    async def reboot(context: TaskContext) -> dict[str, Any]:
        await work()
        return {"rebooted": True}

    return {"echo": echo, "sleep": sleep, "fail": fail, "reboot": reboot}


def raise_nofile_limit() -> int:
    """Raise the open-files soft limit to the hard limit (one socket per device); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-files limit from %d: %s", soft, exc)
    return soft


def fleet_totals(clients: Sequence[DeviceClient]) -> DeviceStats:
    """Sum of the counters of every device."""
    totals = DeviceStats()
    for client in clients:
        totals.add(client.stats)
    return totals


def status_line(clients: Sequence[DeviceClient], planned: int, elapsed: float) -> str:
    """One line: how many devices are connected and what they have done so far."""
    totals = fleet_totals(clients)
    connected = sum(client.connected.is_set() for client in clients)
    ready = sum(client.ready.is_set() for client in clients)
    return (
        f"[{elapsed:7.1f}s] devices {len(clients)}/{planned} connected {connected} "
        f"ready {ready} | tasks done {totals.tasks_done} succeeded {totals.tasks_succeeded} "
        f"failed {totals.tasks_failed} rejected {totals.tasks_rejected} "
        f"canceled {totals.tasks_canceled} | connects {totals.connects} "
        f"failures {totals.connect_failures} | flooded {totals.requests_flooded}"
    )


class SilentDeviceClient(DeviceClient):
    """A device that connects and subscribes but sends no request: `ready` once connected."""

    async def _greet(self) -> None:
        self.ready.set()


class FloodingDeviceClient(DeviceClient):
    """A misbehaving device: after its hello it publishes requests to `flood_method` as fast as its
    connection takes them (QoS 0, a new id each, FLOOD_WINDOW in flight), never waiting for replies."""

    def __init__(self, *args: Any, flood_method: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flood_method = flood_method

    async def _greet(self) -> None:
        await super()._greet()
        client = self._mqtt
        if client is None:
            return
        topic = request_topic(self.device_id, self._flood_method)
        while True:
            await asyncio.gather(
                *(client.publish(topic, encode_request(new_request_id(), {}), qos=0) for _ in range(FLOOD_WINDOW))
            )
            self.stats.requests_flooded += FLOOD_WINDOW


class Fleet:
    """The simulated devices of one process, started at a bounded rate."""

    def __init__(self, args: argparse.Namespace, ids: Sequence[str]) -> None:
        self.args = args
        self.ids = list(ids)
        self.clients: list[DeviceClient] = []
        self._runs: list[asyncio.Task[None]] = []
        self._rng = random.Random()  # noqa: S311 - decides simulated failures, nothing secret

    def _make_client(self, device_id: str, protocol: ProtocolPreference) -> DeviceClient:
        cert_dir: Path = self.args.cert_dir
        handlers = build_handlers(self.args.work_ms / 1000, self.args.fail_rate, self._rng)
        extra: dict[str, Any] = {}
        kind: type[DeviceClient] = DeviceClient
        if self.args.no_hello:
            kind = SilentDeviceClient
        elif self.args.flood:
            kind, extra = FloodingDeviceClient, {"flood_method": self.args.flood}
        client = kind(
            device_id,
            self.args.host,
            self.args.port,
            self.args.ca,
            cert_dir / f"{device_id}.crt",
            cert_dir / f"{device_id}.key",
            firmware="sim-1.0",
            model="swarm-device-sim",
            capabilities=sorted(handlers),
            protocol=protocol,
            request_timeout=self.args.request_timeout,
            verify_hostname=not self.args.no_verify_hostname,
            ask_next=not self.args.no_ask_next,
            **extra,
        )
        for method, handler in handlers.items():
            client.add_task_handler(method, handler)
        return client

    def _start(self, client: DeviceClient) -> None:
        self.clients.append(client)
        self._runs.append(asyncio.create_task(client.run(), name=f"sim-{client.device_id}"))

    async def start_all(self) -> None:
        """Start every device, `--connect-rate` per second; returns once all are started."""
        protocol: ProtocolPreference = self.args.protocol
        interval = 1 / self.args.connect_rate if self.args.connect_rate > 0 else 0.0
        for device_id in self.ids:
            self._start(self._make_client(device_id, protocol))
            if interval:
                await asyncio.sleep(interval)

    async def stop_all(self) -> None:
        """Stop every device (each disconnects cleanly)."""
        await asyncio.gather(*(client.stop() for client in self.clients))
        await asyncio.gather(*self._runs, return_exceptions=True)


async def simulate(args: argparse.Namespace) -> DeviceStats:
    """Run the fleet until `--duration` is over or a signal arrives; returns the totals."""
    ids = device_ids(args)
    missing = [
        path
        for device_id in ids
        for path in (
            args.cert_dir / f"{device_id}.crt",
            args.cert_dir / f"{device_id}.key",
        )
        if not path.is_file()
    ]
    if missing:
        raise SystemExit(f"missing certificate files: {', '.join(map(str, missing[:5]))}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # asyncio's default executor has min(32, cores + 4) threads: on a small box six handshakes at
    # a time, and a broker that takes seconds to finish each one then caps the connect rate.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=args.connect_threads, thread_name_prefix="connect"))
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if args.duration is not None:
        loop.call_later(args.duration, stop.set)

    fleet = Fleet(args, ids)
    started = time.monotonic()
    starter = asyncio.create_task(fleet.start_all())
    reporter = asyncio.create_task(_report_status(fleet, len(ids), started, args.status_interval))
    await stop.wait()
    starter.cancel()
    reporter.cancel()
    await fleet.stop_all()
    totals = fleet_totals(fleet.clients)
    elapsed = time.monotonic() - started
    print(status_line(fleet.clients, len(ids), elapsed), flush=True)
    print(
        f"summary: {len(fleet.clients)} devices ran {elapsed:.1f}s; tasks done "
        f"{totals.tasks_done} ({totals.tasks_done / elapsed:.1f}/s): succeeded "
        f"{totals.tasks_succeeded}, failed {totals.tasks_failed}, rejected "
        f"{totals.tasks_rejected}, canceled {totals.tasks_canceled}; connects "
        f"{totals.connects}, connect failures {totals.connect_failures}, "
        f"disconnects {totals.disconnects}, hellos {totals.hellos}, configs "
        f"{totals.configs_applied}, malformed messages {totals.malformed_messages}",
        flush=True,
    )
    return totals


async def _report_status(fleet: Fleet, planned: int, started: float, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        print(status_line(fleet.clients, planned, time.monotonic() - started), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `swarm-device-sim` / `python -m swarm_device.simulator`."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    limit = raise_nofile_limit()
    logger.info("open-files limit %d", limit)
    asyncio.run(simulate(args))


if __name__ == "__main__":
    main()
