"""The app as a real OS process (uvicorn), for the fault tests: start, kill -9, terminate, restart.

It runs with the stack's app.env plus the overrides it is given (the test database, fast jobs),
logs to its own file, and is stopped by its pid only.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0


class AppProcess:
    def __init__(self, name: str, port: int, env: dict[str, str], log_file: Path) -> None:
        self.name = name
        self.port = port
        self.env = env
        self.log_file = log_file
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        """Start uvicorn and wait until /healthz answers (the lifespan has started by then)."""
        assert not self.running, f"{self.name} is already running"
        with self.log_file.open("ab") as log:
            log.write(f"---- start {self.starts + 1}\n".encode())
            self.process = await asyncio.create_subprocess_exec(
                str(ROOT / ".venv" / "bin" / "uvicorn"),
                "app.main:create_app_from_env",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-access-log",
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT_S
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as client:
            while True:
                if not self.running:
                    raise RuntimeError(f"{self.name} exited during start-up; see {self.log_file}")
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: no /healthz within {START_TIMEOUT_S} s; see {self.log_file}")
                await asyncio.sleep(0.2)

    async def kill(self) -> None:
        """kill -9: no shutdown code runs, in-flight work is lost as in a crash."""
        if self.process is not None and self.running:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()

    async def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (uvicorn shuts the lifespan down), SIGKILL if it takes longer than timeout_s."""
        if self.process is None or not self.running:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            await self.kill()
