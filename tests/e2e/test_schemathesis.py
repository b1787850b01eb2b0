"""schemathesis against the app served over HTTP: every check, every phase (stateful included).

The CLI runs as a subprocess, as an outside user runs it, against the app as an OS process
(uvicorn, the stack's database and broker) with a valid token; straight to the app, not through
nginx, whose rate limit would answer 429 to a fuzzer. Long-polls are capped at 2 s in that app
(an existing task with `wait=300` would otherwise hold each example for a minute), and the
event stream is left out: it never ends, which is what it is for (tests/e2e/test_events.py).
Deterministic generation and a bounded number of examples keep the run reproducible and within
a few minutes (about two on a quiet box).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from app.settings import Settings
from tests.app_process import ROOT, AppProcess
from tests.conftest import STACK_DIR, bearer

MAX_EXAMPLES = 25
# A bound on the run, not a measurement.
RUN_TIMEOUT_S = 900


@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
async def test_schemathesis_finds_nothing(stack_env: dict[str, str], settings: Settings) -> None:
    env = {
        **stack_env,
        "APP_DATABASE__URL": settings.database.url.get_secret_value(),
        "APP_INSTANCE_NAME": "swarm-schemathesis",
        "APP_TASKS__LONG_POLL_MAX_S": "2",
    }
    report_dir = STACK_DIR / "schemathesis"
    report_dir.mkdir(exist_ok=True)
    app = AppProcess("schemathesis-app", int(stack_env["SWARM_APP_PORT"]) + 9, env, report_dir / "app.log")
    await app.start()
    try:
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            str(ROOT / ".venv" / "bin" / "schemathesis"),
            "--config-file",
            str(Path(__file__).with_name("schemathesis.toml")),
            "run",
            f"{app.url}/openapi.json",
            "--checks",
            "all",
            # Revoking a device keeps its record (revoked_at set, ids never reused): see schemathesis.toml.
            "--exclude-checks",
            "use_after_free",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--exclude-path",
            "/api/v1/events",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--generation-deterministic",
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--header",
            f"Authorization:{bearer(settings)['Authorization']}",
            "--report",
            "junit",
            "--report-dir",
            str(report_dir),
            "--no-color",
            cwd=report_dir,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    finally:
        await app.stop()
    text = output.decode(errors="replace")
    print(f"\nschemathesis ({time.monotonic() - started:.0f} s):\n{text[-5000:]}")
    assert process.returncode == 0, text[-30000:]
