"""The per-device limits' arithmetic: token buckets, verdicts, reports once per window."""

from __future__ import annotations

import asyncio

import pytest

from app.device_limits import ConnectLimiter, DeviceLimiter, LimitEvent, TokenBucket, Verdict
from app.settings import DeviceLimitSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_gives_its_burst_then_its_rate() -> None:
    bucket = TokenBucket.full(rate=10, burst=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.take(0.1)  # one token back after 1/rate
    assert not bucket.take(0.1)
    assert [bucket.take(100.0) for _ in range(6)] == [True] * 5 + [False]  # never above the burst


@pytest.mark.asyncio
async def test_limiter_admits_refuses_then_drops_and_reports_once_per_window() -> None:
    clock = Clock()
    reports: list[tuple[str, LimitEvent]] = []

    async def on_limited(device_id: str, event: LimitEvent) -> None:
        reports.append((device_id, event))

    settings = DeviceLimitSettings(requests_per_s=10, burst=20, report_window_s=60)
    limiter = DeviceLimiter(settings, on_limited, clock=clock)

    verdicts = [limiter.check("flood") for _ in range(40)]
    assert verdicts[:20] == [Verdict.ADMIT] * 20
    # A few `rate_limited` replies (the SDK backs off at the first), then acks only.
    refused = verdicts[20:].count(Verdict.REFUSE)
    assert 1 <= refused <= 5
    assert verdicts[20 + refused :] == [Verdict.DROP] * (20 - refused)
    # Another device is not affected.
    assert limiter.check("quiet") is Verdict.ADMIT
    await limiter.drain()
    assert reports == [("flood", LimitEvent.RATE_LIMITED)]

    clock.now += 30
    limiter.check("flood")
    for _ in range(400):
        limiter.check("flood")
    await limiter.drain()
    assert len(reports) == 1, "reported once per window"
    clock.now += 31
    for _ in range(400):
        limiter.check("flood")
    await limiter.drain()
    assert reports == [("flood", LimitEvent.RATE_LIMITED)] * 2


def test_retry_after_lets_a_tenth_of_the_burst_refill() -> None:
    limiter = DeviceLimiter(DeviceLimitSettings(requests_per_s=50, burst=100))
    assert limiter.retry_after_s == pytest.approx(0.2)


@pytest.mark.asyncio
async def test_connect_storm_blocks_once_per_block_time() -> None:
    clock = Clock()
    reports: list[tuple[str, LimitEvent]] = []

    async def on_limited(device_id: str, event: LimitEvent) -> None:
        reports.append((device_id, event))

    settings = DeviceLimitSettings(connects_per_window=5, report_window_s=60, block_s=30)
    connects = ConnectLimiter(settings, on_limited, clock=clock)
    for _ in range(5):
        connects.connected("steady")
        clock.now += 12  # one connect per refill interval: never blocked
    for _ in range(20):
        connects.connected("storm")
    await asyncio.sleep(0)
    await connects.drain()
    assert reports == [("storm", LimitEvent.BLOCKED)]
    clock.now += 31
    for _ in range(20):
        connects.connected("storm")
    await connects.drain()
    assert reports == [("storm", LimitEvent.BLOCKED)] * 2
