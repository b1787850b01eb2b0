"""Per-device limits on requests and connects: token buckets per device, checked before any
database work (decision 46).

A device that sends more requests than its bucket allows gets `rate_limited` error replies (while
a second, small bucket allows replies: REFUSALS_PER_S; beyond that its requests are acknowledged
and dropped, so that a flood costs the core an ack per message, not a reply). The first time a device is limited in a
window the operator is told (`RATE_LIMITED`: a metric, a device event, `devices.last_limited_at`),
once per device per window and process.

That alone does not protect the other devices: every device's requests of a route share one
queue, which the core works off in order, and a flood that arrives faster than the core acks
sits ahead of everyone (measured: a paho QoS 0 flood of ~2,000/s against ~250 acks/s on the
shared bench box). So the `FloodMeter` watches every device's up-traffic beside the queues (a
copy of each message in a short drop-head queue, read without acks) and reports a device
above `block_rate_per_s` as `BLOCKED`; so does the `ConnectLimiter`, fed with the broker's
connection events, for a device that connects more often than `connects_per_window` in a
window. The core then closes a blocked device's connections and refuses new ones at the broker
for `block_s`: its flood stops at the broker instead of filling the queues every device shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage
from yarl import URL

from app import metrics
from app.broker import AMQ_TOPIC, tls_context
from app.settings import BrokerSettings, DeviceLimitSettings

log = logging.getLogger(__name__)

# `rate_limited` replies a device gets at most: the SDK backs off at the first one.
REFUSALS_PER_S = 1.0
REFUSALS_BURST = 5.0
# Buckets of devices quiet for this long are forgotten (a full bucket is the same as none).
IDLE_FORGET_S = 300.0


class LimitEvent(StrEnum):
    """What is reported about a limited device (also the name of its device event)."""

    RATE_LIMITED = "rate_limited"
    BLOCKED = "blocked"


class Verdict(Enum):
    ADMIT = "admit"
    REFUSE = "refuse"  # answer `rate_limited`
    DROP = "drop"  # acknowledge without a reply


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens a second up to `burst`; each request takes one."""

    rate: float
    burst: float
    tokens: float
    at: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)


@dataclass(slots=True)
class _DeviceState:
    requests: TokenBucket
    refusals: TokenBucket
    reported_at: float = field(default=float("-inf"))


OnLimited = Callable[[str, LimitEvent], Coroutine[Any, Any, None]]


class _Reporter:
    """Runs the `on_limited` reports in the background, logging failures; `drain` awaits them."""

    def __init__(self, on_limited: OnLimited | None) -> None:
        self._on_limited = on_limited
        self._reports: set[asyncio.Task[None]] = set()

    def report(self, device_id: str, event: LimitEvent) -> None:
        log.warning("device %s is over its limits: %s", device_id, event.value)
        if self._on_limited is not None:
            report = asyncio.create_task(self._on_limited(device_id, event))
            self._reports.add(report)
            report.add_done_callback(self._reported)

    def _reported(self, report: asyncio.Task[None]) -> None:
        self._reports.discard(report)
        if not report.cancelled() and report.exception() is not None:
            log.error("recording that a device was limited failed", exc_info=report.exception())

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Let the reports in flight finish (bounded), before the database closes."""
        if self._reports:
            await asyncio.wait(set(self._reports), timeout=timeout_s)


class DeviceLimiter(_Reporter):
    """The request buckets of the devices whose requests this process consumes."""

    def __init__(
        self,
        settings: DeviceLimitSettings,
        on_limited: OnLimited | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(on_limited)
        self._settings = settings
        self._clock = clock
        self._devices: dict[str, _DeviceState] = {}
        self._swept_at = clock()

    @property
    def retry_after_s(self) -> float:
        """How long a refused device should wait: until its bucket holds a tenth of its burst."""
        return round(max(self._settings.burst / 10, 1.0) / self._settings.requests_per_s, 3)

    def check(self, device_id: str) -> Verdict:
        now = self._clock()
        state = self._devices.get(device_id)
        if state is None:
            if now - self._swept_at > IDLE_FORGET_S:
                self._sweep(now)
            rate, burst = self._settings.requests_per_s, float(self._settings.burst)
            state = _DeviceState(
                TokenBucket.full(rate, burst, now), TokenBucket.full(REFUSALS_PER_S, REFUSALS_BURST, now)
            )
            self._devices[device_id] = state
        if state.requests.take(now):
            return Verdict.ADMIT
        metrics.REQUESTS_LIMITED.labels(device_id).inc()
        if now - state.reported_at >= self._settings.report_window_s:
            state.reported_at = now
            self.report(device_id, LimitEvent.RATE_LIMITED)
        return Verdict.REFUSE if state.refusals.take(now) else Verdict.DROP

    def _sweep(self, now: float) -> None:
        self._swept_at = now
        idle = [d for d, s in self._devices.items() if now - s.requests.at > IDLE_FORGET_S]
        for device_id in idle:
            del self._devices[device_id]


class ConnectLimiter(_Reporter):
    """The connect buckets of devices, fed with the broker's connection events (presence):
    `connects_per_window` per `report_window_s`, refilled evenly; a device past that is reported
    `BLOCKED` (once per `block_s`: it cannot connect meanwhile anyway)."""

    def __init__(
        self,
        settings: DeviceLimitSettings,
        on_limited: OnLimited | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(on_limited)
        burst = float(settings.connects_per_window)
        self._buckets = _Buckets(burst / settings.report_window_s, burst, settings.block_s, clock)

    def connected(self, device_id: str) -> None:
        if self._buckets.over(device_id):
            self.report(device_id, LimitEvent.BLOCKED)


# The meter's queue: a copy of every device request, the newest METER_QUEUE_LENGTH kept (it only
# samples: when the meter falls behind it sees the latest traffic, which is what it judges).
METER_QUEUE = "swarm.flood-meter"
METER_BINDING = "dev.*.up.#"
METER_QUEUE_LENGTH = 2000
METER_PREFETCH = 1000
_METER_RETRY_S = 5.0


class FloodMeter(_Reporter):
    """Reports a device whose requests come faster than `block_rate_per_s` (over a burst of
    `block_burst`) as `BLOCKED`, at most once per `block_s`.

    One consumer for all app processes (single active consumer): it sees every device's traffic.
    It reads with auto-ack on its own AMQP connection and looks at the routing key only.
    """

    def __init__(
        self,
        broker: BrokerSettings,
        settings: DeviceLimitSettings,
        on_limited: OnLimited | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(on_limited)
        self._url = URL(broker.url).update_query(auth="EXTERNAL", name="swarm-core flood meter")
        self._tls = tls_context(broker)
        self._buckets = _Buckets(settings.block_rate_per_s, float(settings.block_burst), settings.block_s, clock)
        self._runner: asyncio.Task[None] | None = None

    def seen(self, device_id: str) -> None:
        """One request of this device went by."""
        if self._buckets.over(device_id):
            self.report(device_id, LimitEvent.BLOCKED)

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="flood-meter")

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        await self.drain()

    async def _run(self) -> None:
        while True:
            try:
                connection = await aiormq.connect(self._url, context=self._tls)
                try:
                    channel = await connection.channel()
                    await channel.basic_qos(prefetch_count=METER_PREFETCH)
                    await channel.queue_declare(
                        METER_QUEUE,
                        durable=True,
                        arguments={
                            "x-max-length": METER_QUEUE_LENGTH,
                            "x-overflow": "drop-head",
                            "x-single-active-consumer": True,
                        },
                    )
                    await channel.queue_bind(METER_QUEUE, AMQ_TOPIC.name, routing_key=METER_BINDING)
                    await channel.basic_consume(METER_QUEUE, self._on_message, no_ack=True)
                    await connection.closing
                finally:
                    await connection.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("flood meter disconnected (%r); reconnecting in %.0f s", exc, _METER_RETRY_S)
            await asyncio.sleep(_METER_RETRY_S)

    async def _on_message(self, message: DeliveredMessage) -> None:
        # dev.{device_id}.up....: the broker's topic permissions make the device id trustworthy.
        parts = (message.routing_key or "").split(".", 2)
        if len(parts) == 3:
            self.seen(parts[1])


class _Buckets:
    """Token buckets by device: `over` takes a token and says if the device just went over, at
    most once per `quiet_s`."""

    def __init__(self, rate: float, burst: float, quiet_s: float, clock: Callable[[], float]) -> None:
        self._rate = rate
        self._burst = burst
        self._quiet_s = quiet_s
        self._clock = clock
        self._devices: dict[str, tuple[TokenBucket, float]] = {}

    def over(self, device_id: str) -> bool:
        now = self._clock()
        bucket, over_at = self._devices.get(device_id) or (TokenBucket.full(self._rate, self._burst, now), -math.inf)
        went_over = not bucket.take(now) and now - over_at >= self._quiet_s
        self._devices[device_id] = (bucket, now if went_over else over_at)
        if len(self._devices) > 100_000:
            # Bounded memory: forget the buckets that have refilled (the same as none).
            full_after = self._burst / self._rate
            self._devices = {d: v for d, v in self._devices.items() if v[0].at > now - full_after}
        return went_over
