"""What a run stands on: a stack's services, the benchmark's own database, the app as uvicorn processes."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
from alembic.config import Config
from sqlalchemy.engine import make_url

from alembic import command
from app.db import asyncpg_dsn
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BENCH_DATABASE = "swarm_bench"
APP_START_TIMEOUT_S = 60.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Stack:
    """A stack started by scripts/stack.sh, with its app.env values."""

    name: str
    values: dict[str, str]

    @property
    def run_dir(self) -> Path:
        return ROOT / ".run" / self.name

    @property
    def app_port(self) -> int:
        return int(self.values["SWARM_APP_PORT"])

    @property
    def settings(self) -> Settings:
        """The stack's settings, pointed at the benchmark database."""
        stack_url = self.values["APP_DATABASE__URL"]
        url = make_url(stack_url).set(database=BENCH_DATABASE).render_as_string(hide_password=False)
        return Settings(_env_file=self.run_dir / "app.env", database={"url": url})

    def broker_pid(self) -> int | None:
        """The stack's RabbitMQ node (its pid file, written by scripts/stack.sh)."""
        with contextlib.suppress(OSError, ValueError):
            return int((self.run_dir / "rabbitmq" / "node.pid").read_text())
        return None

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.run_dir / "pg" / "data" / "postmaster.pid").read_text().split()[0])
        return None

    @property
    def dsn(self) -> str:
        """asyncpg DSN of the benchmark database."""
        return asyncpg_dsn(self.settings.database.url.get_secret_value())


def start_services(name: str, port_base: int) -> Stack:
    """Start (idempotently) PKI, PostgreSQL and RabbitMQ of the stack; returns its settings."""
    env = {**os.environ, "SWARM_STACK": name, "SWARM_PORT_BASE": str(port_base)}
    subprocess.run(
        [str(ROOT / "scripts" / "stack.sh"), "services"], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL
    )
    values: dict[str, str] = {}
    for line in (ROOT / ".run" / name / "app.env").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            values[key.strip()] = value.strip()
    return Stack(name, values)


async def fresh_database(stack: Stack) -> None:
    """Drop and re-create the benchmark database, then `alembic upgrade head`."""
    url = stack.settings.database.url.get_secret_value()
    admin = await asyncpg.connect(asyncpg_dsn(make_url(url).set(database="postgres").render_as_string(False)))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{BENCH_DATABASE}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{BENCH_DATABASE}"')
    finally:
        await admin.close()
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = url
    config.attributes["configure_logger"] = False
    await asyncio.to_thread(command.upgrade, config, "head")


class AppProcesses:
    """The app as the README runs it: uvicorn with uvloop and httptools, `workers` processes."""

    def __init__(self, stack: Stack, workers: int, log_file: Path) -> None:
        self._stack = stack
        self._workers = workers
        self._log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._stack.app_port}"

    async def start(self) -> None:
        env = {
            **os.environ,
            **self._stack.values,
            "APP_DATABASE__URL": self._stack.settings.database.url.get_secret_value(),
        }
        command_line = [
            str(ROOT / ".venv" / "bin" / "uvicorn"),
            "app.main:create_app_from_env",
            "--factory",
            "--host=127.0.0.1",
            f"--port={self._stack.app_port}",
            "--loop=uvloop",
            "--http=httptools",
            f"--workers={self._workers}",
            # One log line per request would cost more than some of what is measured.
            "--no-access-log",
        ]
        with self._log_file.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                command_line,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=die_with_harness,
            )
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + APP_START_TIMEOUT_S
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2) as client:
            while loop.time() < deadline:
                if self._process is not None and self._process.poll() is not None:
                    raise RuntimeError(f"the app exited during start-up; see {self._log_file}")
                with contextlib.suppress(httpx.HTTPError):
                    # Every worker must be up: ask a few times more than there are workers.
                    answers = [(await client.get("/readyz")).status_code for _ in range(self._workers * 4)]
                    if all(code == 200 for code in answers):
                        return
                await asyncio.sleep(0.5)
        raise RuntimeError(f"the app did not become ready within {APP_START_TIMEOUT_S} s; see {self._log_file}")

    def pids(self) -> list[int]:
        """The uvicorn process and its workers."""
        if self._process is None:
            return []
        return [self._process.pid, *child_pids(self._process.pid)]

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


@contextlib.asynccontextmanager
async def running_app(stack: Stack, workers: int, log_file: Path) -> AsyncIterator[AppProcesses]:
    app = AppProcesses(stack, workers, log_file)
    try:
        await app.start()
        yield app
    finally:
        await app.stop()


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            children.extend(int(p) for p in task.read_text().split())
    return children


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes, from /proc."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int], *, with_children: bool = False) -> float:
    """CPU time (user + system) used so far by these processes, from /proc; `with_children` adds
    that of their children that have ended (PostgreSQL's back-ends come and go)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            # The fields after the command name, which is in parentheses and may hold spaces.
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
            if with_children:
                total += int(fields[13]) + int(fields[14])
    return total / _CLOCK_TICKS


@dataclass(frozen=True)
class Commit:
    """The code a run measured: ROOT's HEAD, and whether its tracked files differ from it."""

    sha: str
    dirty: bool


def measured_commit() -> Commit:
    """The commit of the tree the harness starts the app from (`unknown` outside a git checkout)."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return Commit("unknown", dirty=True)
    changed = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return Commit(head.stdout.strip(), dirty=bool(changed))


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all processors since boot, from the first line of /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    # guest and guest_nice are already counted in user and nice.
    total = sum(fields[:8])
    return total - idle, total


async def busy_percent(sample_s: float) -> float:
    """How busy the whole machine's processors were over the next `sample_s` seconds, in percent."""
    busy_before, total_before = _cpu_ticks()
    await asyncio.sleep(sample_s)
    busy_after, total_after = _cpu_ticks()
    elapsed = total_after - total_before
    return round(100 * (busy_after - busy_before) / elapsed, 1) if elapsed else 0.0


def python_command(*module_and_args: str) -> list[str]:
    return [sys.executable, "-m", *module_and_args]


async def stop_process(process: asyncio.subprocess.Process, timeout_s: float) -> None:
    """SIGTERM, and SIGKILL if it is still there after `timeout_s`."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            process.kill()
            await process.wait()


def die_with_harness() -> None:
    """`preexec_fn` of what the harness starts in a session of its own (so that a Ctrl-C reaches
    only the harness, which stops it in order): SIGTERM when the harness dies, however it dies, so
    that a killed run leaves no app holding the stack's port and no devices consuming its queues."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class CpuMeter:
    """CPU seconds each part of the system used since the meter was made: broker, app, PostgreSQL,
    simulator and this harness."""

    def __init__(self, stack: Stack, app_pids: list[int], simulator_pids: list[int]) -> None:
        self._stack = stack
        self._app = app_pids
        self._simulator = simulator_pids
        self._start = self._now()

    def _now(self) -> dict[str, float]:
        broker = self._stack.broker_pid()
        postmaster = self._stack.postmaster_pid()
        return {
            "broker": cpu_seconds([broker] if broker else []),
            "app": cpu_seconds(self._app),
            # Back-ends come and go: the postmaster keeps the CPU time of those that ended.
            "postgres": cpu_seconds([postmaster], with_children=True) + cpu_seconds(child_pids(postmaster))
            if postmaster
            else 0.0,
            "simulator": cpu_seconds(self._simulator),
            "harness": time.process_time(),
        }

    def used(self) -> dict[str, float]:
        now = self._now()
        return {name: now[name] - self._start[name] for name in now}
