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


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_short_mode_reports_every_section(stack_env: dict[str, str], tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    port_base = int(stack_env["SWARM_AMQP_PORT"]) - 672
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--short",
            f"--stack={STACK}",
            f"--port-base={port_base}",
            f"--output={output}",
        ],
        cwd=ROOT,
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
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
    # canceled after the round trip, so that nothing of it runs during the sections after it.
    # Intake's devices never connect, so its tasks are always among them.
    left = results["roundtrip"]["left_for_next_section"]
    assert left["tasks_canceled"] > 0
    assert isinstance(left["messages_purged"], int)
    assert results["connections"]["stayed_connected"] == results["connections"]["target"]
    assert {t["target"] for t in results["targets"]}, "the targets are evaluated"
    assert "intake: persisted" in completed.stdout
