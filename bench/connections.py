"""Connections: how many simulated TLS devices connect and stay connected, and what each costs.

The simulator connects `target` devices at `connect_rate` per second; once all are up (or none
joined for a while) the fleet is held and the lowest connected count seen is what "stayed".
Memory per device is the growth of the broker node (its live Erlang memory total, from the
management API), of the app processes and of the simulator processes (RSS), divided by the devices
connected. CPU per connect is each component's CPU time while the fleet connected (and said
hello), divided by the devices connected: on a shared box it tells which component runs out first,
where the connect rate alone does not. CPU while holding is each component's share of a core during the hold.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from faststream.rabbit import RabbitQueue

from app.broker import create_broker
from app.settings import Settings
from bench.env import CpuMeter, Stack, rss_bytes
from bench.fleet import Fleet
from bench.progress import Progress
from bench.simulator import simulating

PLATEAU_S = 20.0
# Seconds between two points of the connected-count curve kept in the results.
CURVE_STEP_S = 5.0
# A node holding thousands of MQTT connections answers its management API slowly.
MANAGEMENT_TIMEOUT_S = 120.0


async def queue_backlogs(settings: Settings) -> dict[str, int] | None:
    """Messages waiting in the app's own queues (`swarm.*`): the device requests and presence
    events the app has not worked off yet. Names from the management API (None when it does not
    answer in time: it lists every device's session queue too, and is slow on a busy node), the
    counts from the queues themselves (the statistics may be a minute old)."""
    broker = settings.broker
    auth = (broker.management_user, broker.management_password.get_secret_value())
    params = {"columns": "name", "name": r"^swarm\.", "use_regex": "true", "page": "1", "page_size": "100"}
    try:
        async with httpx.AsyncClient(base_url=broker.management_url, auth=auth, timeout=MANAGEMENT_TIMEOUT_S) as client:
            response = await client.get(f"/api/queues/{quote(broker.devices_vhost, safe='')}", params=params)
            response.raise_for_status()
    except httpx.HTTPError:
        return None
    core = create_broker(broker)
    await core.connect()
    counts: dict[str, int] = {}
    try:
        for name in sorted(q["name"] for q in response.json()["items"]):
            declared = await (await core.declare_queue(RabbitQueue(name, declare=False))).declare()
            if declared.message_count:
                counts[name] = declared.message_count
    finally:
        await core.stop()
    return counts


async def broker_memory(settings: Settings) -> int:
    """The node's Erlang memory now: `/api/nodes`' `mem_used` is a sample up to a stats interval old."""
    broker = settings.broker
    auth = (broker.management_user, broker.management_password.get_secret_value())
    async with httpx.AsyncClient(base_url=broker.management_url, auth=auth, timeout=MANAGEMENT_TIMEOUT_S) as client:
        nodes = await client.get("/api/nodes", params={"columns": "name"})
        nodes.raise_for_status()
        node = nodes.json()[0]["name"]
        response = await client.get(f"/api/nodes/{quote(node, safe='')}/memory")
        response.raise_for_status()
        return int(response.json()["memory"]["total"]["erlang"])


async def run(
    stack: Stack,
    fleet: Fleet,
    *,
    target: int,
    connect_rate: float,
    hold_s: float,
    processes: int,
    no_hello: bool = False,
    app_pids: list[int],
    log_file: Path,
    progress: Progress,
) -> dict[str, Any]:
    settings = stack.settings
    broker_before = await broker_memory(settings)
    app_before = rss_bytes(app_pids)
    async with simulating(
        settings, fleet, target, connect_rate, log_file, processes=processes, no_hello=no_hello
    ) as simulator:
        await asyncio.sleep(1.0)
        sim_before = rss_bytes(simulator.pids)
        cpu = CpuMeter(stack, app_pids, simulator.pids)
        started = time.monotonic()
        best, best_at = 0, started
        curve: list[tuple[float, int, int]] = []
        status = lambda: f"{simulator.connected} of {target} connected, {simulator.ready} said hello"  # noqa: E731
        async with progress.ticking("connections", status):
            # Give up at a plateau, or when connecting takes three times what the rate allows.
            give_up_at = started + 3 * target / connect_rate + PLATEAU_S
            while simulator.ready < target and time.monotonic() - best_at < PLATEAU_S and time.monotonic() < give_up_at:
                simulator.check_running()
                if simulator.ready > best:
                    best, best_at = simulator.ready, time.monotonic()
                elapsed = time.monotonic() - started
                if not curve or elapsed - curve[-1][0] >= CURVE_STEP_S:
                    curve.append((round(elapsed, 1), simulator.connected, simulator.ready))
                await asyncio.sleep(0.5)
            connect_s = time.monotonic() - started
            cpu_used = cpu.used()
            connected_at_end = simulator.connected
            backlogs = await queue_backlogs(settings)
            lowest = simulator.connected
            hold_cpu = CpuMeter(stack, app_pids, simulator.pids)
            hold_started = time.monotonic()
            while time.monotonic() < hold_started + hold_s:
                lowest = min(lowest, simulator.connected)
                await asyncio.sleep(0.5)
            held_s = time.monotonic() - hold_started
            hold_cpu_used = hold_cpu.used()
        connected = max(lowest, 1)
        broker_after = await broker_memory(settings)
        app_after = rss_bytes(app_pids)
        sim_after = rss_bytes(simulator.pids)
        ready = simulator.ready
    return {
        "target": target,
        "simulator_processes": processes,
        "no_hello": no_hello,
        "connected": simulator.connected,
        "ready": ready,
        "connect_failures": simulator.connect_failures,
        "stayed_connected": lowest,
        "connect_s": round(connect_s, 1),
        "connect_per_s": round(ready / connect_s, 1),
        "curve_s_connected_ready": curve,
        "cpu_ms_per_connect": {
            name: round(used * 1000 / max(connected_at_end, 1), 2) for name, used in cpu_used.items()
        },
        "app_queue_backlogs": backlogs,
        "hold_s": hold_s,
        # The fleet's upkeep once connected (keepalives, the broker's statistics, app backlogs).
        "hold_cpu_percent": {name: round(used * 100 / held_s, 1) for name, used in hold_cpu_used.items()},
        "broker_bytes_per_device": (broker_after - broker_before) // connected,
        "app_bytes_per_device": max(0, app_after - app_before) // connected,
        "simulator_bytes_per_device": (sim_after - sim_before) // connected,
        "broker_mem_after_bytes": broker_after,
    }
