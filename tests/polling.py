"""Waiting for state that can only be observed by asking again (HTTP, broker)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def eventually(
    condition: Callable[[], Awaitable[bool] | bool], within_s: float = 10.0, every_s: float = 0.1
) -> None:
    """Return once `condition()` holds; fail with TimeoutError after `within_s` seconds."""
    async with asyncio.timeout(within_s):
        while True:
            outcome = condition()
            if await outcome if isinstance(outcome, Awaitable) else outcome:
                return
            await asyncio.sleep(every_s)
