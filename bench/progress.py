"""The progress display: a line per step, a ticker line every few seconds while a step runs, and
what every task waits on when a run is stopped or overruns its deadline."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any


class Progress:
    def __init__(self) -> None:
        self._started = time.monotonic()

    def say(self, section: str, message: str) -> None:
        print(f"[{time.monotonic() - self._started:6.1f}s] {section:<11} {message}", file=sys.stderr, flush=True)

    @contextlib.asynccontextmanager
    async def ticking(self, section: str, status: Callable[[], str], every_s: float = 2.0) -> AsyncIterator[None]:
        """Print `status()` every `every_s` seconds while the block runs."""

        async def tick() -> None:
            while True:
                await asyncio.sleep(every_s)
                self.say(section, status())

        ticker = asyncio.create_task(tick())
        try:
            yield
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker


def percentiles_ms(samples_s: list[float]) -> dict[str, float]:
    """p50/p95/p99/max in milliseconds (nearest rank) of durations in seconds."""
    if not samples_s:
        return {"count": 0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(samples_s)

    def rank(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, int(p * len(ordered) + 0.5) - 1))] * 1000, 2)

    return {"count": len(ordered), "p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99), "max": rank(1.0)}


def print_waits(reason: str) -> None:
    """Each running task's chain of awaits, innermost last, to stderr: where a stuck run is stuck.
    (`Task.print_stack` shows only the outermost frame of a suspended coroutine.)"""
    print(f"\n--- {reason}: what each task of the harness is waiting on ---", file=sys.stderr)
    for task in asyncio.all_tasks():
        print(f"{task.get_name()}:", file=sys.stderr)
        for line in _await_chain(task.get_coro()):
            print(f"    {line}", file=sys.stderr)
    sys.stderr.flush()


def _await_chain(coro: Any) -> list[str]:
    lines = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            lines.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return lines
