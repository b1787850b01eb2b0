"""Fairness: other devices' round trips while one device floods an up-topic (issue 18).

Victim devices run no-op tasks offered at a fixed rate (as the round-trip section, open loop),
first alone, then while one more device of the fleet, a simulator with `--flood METHOD`,
publishes METHOD requests as fast as its MQTT connection takes them (QoS 0, never waiting for a
reply). The figure that matters: the victims' p99 under the flood against their p99 alone.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg

from app.settings import Settings
from bench.fleet import Fleet, purge_queues
from bench.progress import Progress
from bench.roundtrip import round_trips, wait_ready
from bench.simulator import Simulator, simulating

# The flood is under way (past its hello) when the victims' tasks are offered: they meet it from its start.
FLOOD_HEAD_START_S = 0.5
FLOOD_START_TIMEOUT_S = 60.0


async def run(
    settings: Settings,
    dsn: str,
    fleet: Fleet,
    *,
    app_port: int,
    victims: int,
    rate: float,
    duration_s: float,
    flood_method: str,
    headers: dict[str, str],
    log_file: Path,
    progress: Progress,
) -> dict[str, Any]:
    flooder = fleet.ids(victims + 1)[-1]
    ids = fleet.ids(victims)
    async with simulating(settings, fleet, victims, connect_rate=100, log_file=log_file) as simulator:
        await wait_ready(simulator, victims, victims / 10 + 60, "fairness", progress)
        progress.say("fairness", f"{victims} devices, {rate:g} tasks/s for {duration_s:g} s, no flood")
        alone = await round_trips(dsn, app_port, ids, rate, duration_s, headers, progress)
        async with simulating(
            settings, fleet, 1, connect_rate=1, log_file=log_file, first=victims + 1, flood=flood_method
        ) as flood:
            await _flooding(flood, FLOOD_START_TIMEOUT_S)
            started, sent_before = time.monotonic(), flood.flooded
            await asyncio.sleep(FLOOD_HEAD_START_S)
            progress.say("fairness", f"{flooder} floods {flood_method} ({flood.flooded} sent so far); same load again")
            flooded = await round_trips(dsn, app_port, ids, rate, duration_s, headers, progress)
            flood_s, flood_sent = time.monotonic() - started, flood.flooded - sent_before
            flood_connects = flood.connected
    limited_at = await _last_limited_at(dsn, flooder)
    # The flood's requests still queued would be worked off during the later sections (or tests).
    leftovers = await purge_queues(settings)
    # None: no victim's task finished during the flood (the ratio would be 0 and look good).
    ratio = flooded["latency_ms"]["p99"] / max(alone["latency_ms"]["p99"], 0.001) if flooded["completed"] else None
    return {
        "victims": victims,
        "offered_per_s": rate,
        "duration_s": duration_s,
        "flood_method": flood_method,
        "flooder": flooder,
        "flood_sent": flood_sent,
        "flood_per_s": round(flood_sent / flood_s, 1),
        "flooder_connected_at_end": flood_connects,
        "flooder_limited": limited_at is not None,
        "purged_after": leftovers,
        "alone": alone,
        "flooded": flooded,
        "p99_ratio": round(ratio, 2) if ratio is not None else None,
    }


async def _flooding(flood: Simulator, timeout_s: float) -> None:
    """Until the flooding device has sent its first requests. Not until it is ready: the core may
    block it (and close its connection) before a status line of the simulator shows it ready."""
    async with asyncio.timeout(timeout_s):
        while flood.flooded == 0:
            flood.check_running()
            await asyncio.sleep(0.1)


async def _last_limited_at(dsn: str, device_id: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT last_limited_at FROM devices WHERE id = $1", device_id)
    finally:
        await conn.close()
