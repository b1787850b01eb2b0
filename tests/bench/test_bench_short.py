"""The benchmark harness works: its short mode runs against the test stack and reports every section.

It checks the harness, not the speed: every figure must be there and positive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import STOP_GRACE_S
from tests.conftest import ROOT, STACK

SECTIONS = {
    "raw": [
        "postgres_insert_commit.per_s",
        "amqp_publish_confirmed.per_s",
        "roundtrip.per_s",
        "roundtrip.latency_ms.p50",
    ],
    "intake": [
        "persisted_per_s",
        "noticed_per_s",
        "ratio_to_db_ceiling",
        "answer_latency_ms.p50",
        "batch.persisted_per_s",
        "http_floor.per_s",
        "app_cpu_ms_per_task",
        "http_floor.app_cpu_ms_per_request",
    ],
    "roundtrip": ["completed", "achieved_per_s", "latency_ms.p50", "latency_ms.p99", "share_of_raw_ceiling"],
    "scale": ["tasks", "devices", "next_empty_ms.p50", "next_loaded_ms.p50"],
    "connections": ["stayed_connected"],
    "processes": ["empty.per_s", "loaded.per_s", "ratio_to_db_ceiling", "loaded_instances"],
    "fairness": ["flood_sent", "flood_per_s", "alone.latency_ms.p99"],
}
# Memory growth over a few dozen devices is within the noise of a node's garbage collection (the
# previous section's devices are still being freed): it must be measured, but its sign is noise.
MEMORY_FIGURES = ["connections.broker_bytes_per_device", "connections.simulator_bytes_per_device"]


def _figure(results: dict[str, object], path: str) -> object:
    value: object = results
    for key in path.split("."):
        assert isinstance(value, dict), path
        value = value[key]
    return value


def run_harness(args: list[str], deadline_s: float) -> subprocess.CompletedProcess[str]:
    """The harness as a subprocess that stops itself past `deadline_s`: it prints what each of its
    tasks was waiting on and stops the app and the simulators it started. Should it not exit even
    then, it is killed, and what it started dies with it (bench.env.die_with_harness)."""
    process = subprocess.Popen(
        [*args, f"--deadline-s={deadline_s}"],
        cwd=ROOT,
        env={**os.environ},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=deadline_s + STOP_GRACE_S + 30)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"the harness did not stop by itself after its {deadline_s:.0f} s deadline:\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_short_mode_reports_every_section(stack_env: dict[str, str], tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    port_base = int(stack_env["SWARM_AMQP_PORT"]) - 672
    # Under a minute on a quiet box; several on a crowded one.
    completed = run_harness(
        [
            sys.executable,
            "-m",
            "bench",
            "--short",
            f"--stack={STACK}",
            f"--port-base={port_base}",
            f"--output={output}",
        ],
        deadline_s=420,
    )
    assert completed.returncode == 0, completed.stderr[-6000:]
    results = json.loads(output.read_text())
    for section, figures in SECTIONS.items():
        for figure in figures:
            value = _figure(results, f"{section}.{figure}")
            assert isinstance(value, int | float), f"{section}.{figure} = {value!r}"
            assert value > 0, f"{section}.{figure} = {value!r}"
    for figure in MEMORY_FIGURES:
        value = _figure(results, figure)
        assert isinstance(value, int), f"{figure} = {value!r}"
    assert results["roundtrip"]["not_final_after_wait"] == 0
    # What the sections before left unfinished (intake's tasks of devices that never connect) is
    # canceled before the round trip, and the round trip itself leaves nothing unfinished.
    earlier = results["roundtrip"]["left_by_earlier_sections"]
    assert earlier["tasks_canceled"] > 0
    assert results["roundtrip"]["left_for_next_section"]["tasks_canceled"] == 0
    assert results["connections"]["stayed_connected"] == results["connections"]["target"]
    # The flooding device was seen: refused and blocked (the speed of it is the bench's to show).
    assert results["fairness"]["flooder_limited"] is True
    # None when no other device's task finished during the flood: measured, not hidden as 0.
    assert results["fairness"]["p99_ratio"] is None or results["fairness"]["p99_ratio"] > 0
    assert {t["target"] for t in results["targets"]}, "the targets are evaluated"
    assert "intake: persisted" in completed.stdout

    # What was measured, and on what kind of box.
    meta = results["meta"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert meta["commit"] == head
    assert isinstance(meta["commit_dirty"], bool)
    assert f"commit {head[:7]}" in completed.stdout
    box = meta["box_before"]
    assert 0 <= box["cpu_busy_pct"] <= 100
    assert box["busy"] == (box["cpu_busy_pct"] > box["threshold_pct"])
    assert f"processors {box['cpu_busy_pct']}% busy" in completed.stdout
    assert ("WARNING: the box was busy" in completed.stdout) == box["busy"]
