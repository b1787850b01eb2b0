"""Connections: how many simulated TLS devices connect and stay connected, and what each costs.

The simulator connects `target` devices at `connect_rate` per second; once all are up (or none
joined for a while) the fleet is held and the lowest connected count seen is what "stayed".
Memory per device is the growth of the broker node (`mem_used` from the management API), of the
app processes and of the simulator process (RSS), divided by the devices connected.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from app.settings import Settings
from bench.env import rss_bytes
from bench.fleet import Fleet
from bench.progress import Progress
from bench.simulator import simulating

PLATEAU_S = 20.0


async def broker_memory(settings: Settings) -> int:
    broker = settings.broker
    auth = (broker.management_user, broker.management_password.get_secret_value())
    async with httpx.AsyncClient(base_url=broker.management_url, auth=auth, timeout=30) as client:
        response = await client.get("/api/nodes", params={"columns": "name,mem_used"})
        response.raise_for_status()
        return int(response.json()[0]["mem_used"])


async def run(
    settings: Settings,
    fleet: Fleet,
    *,
    target: int,
    connect_rate: float,
    hold_s: float,
    app_pids: list[int],
    log_file: Path,
    progress: Progress,
) -> dict[str, Any]:
    broker_before = await broker_memory(settings)
    app_before = rss_bytes(app_pids)
    async with simulating(settings, fleet, target, connect_rate, log_file) as simulator:
        sim_pid = [simulator.process.pid]
        await asyncio.sleep(1.0)
        sim_before = rss_bytes(sim_pid)
        started = time.monotonic()
        best, best_at = 0, started
        async with progress.ticking("connections", lambda: f"{simulator.connected} of {target} connected"):
            # Give up at a plateau, or when connecting takes three times what the rate allows.
            give_up_at = started + 3 * target / connect_rate + PLATEAU_S
            while (
                simulator.connected < target
                and time.monotonic() - best_at < PLATEAU_S
                and time.monotonic() < give_up_at
            ):
                if simulator.process.returncode is not None:
                    raise RuntimeError("the simulator exited")
                if simulator.connected > best:
                    best, best_at = simulator.connected, time.monotonic()
                await asyncio.sleep(0.5)
            connect_s = time.monotonic() - started
            lowest = simulator.connected
            hold_until = time.monotonic() + hold_s
            while time.monotonic() < hold_until:
                lowest = min(lowest, simulator.connected)
                await asyncio.sleep(0.5)
        connected = max(lowest, 1)
        broker_after = await broker_memory(settings)
        app_after = rss_bytes(app_pids)
        sim_after = rss_bytes(sim_pid)
    return {
        "target": target,
        "connected": simulator.connected,
        "stayed_connected": lowest,
        "connect_s": round(connect_s, 1),
        "hold_s": hold_s,
        "broker_bytes_per_device": (broker_after - broker_before) // connected,
        "app_bytes_per_device": max(0, app_after - app_before) // connected,
        "simulator_bytes_per_device": (sim_after - sim_before) // connected,
        "broker_mem_after_bytes": broker_after,
    }
