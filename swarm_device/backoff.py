"""Exponential reconnect backoff with jitter.

A fleet that loses its broker comes back all at once; the jitter spreads the reconnects so the
broker is not hit by thousands of TLS handshakes in the same second.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays `minimum * factor**n`, capped at `maximum`, each shortened by a random jitter.

    With `jitter=0.5` a delay is drawn uniformly from the upper half of its step
    (`[base/2, base]`), so two devices that failed together drift apart.
    """

    def __init__(
        self,
        minimum: float,
        maximum: float,
        *,
        factor: float = 2.0,
        jitter: float = 0.5,
        random_fn: Callable[[], float] = random.random,
    ) -> None:
        if minimum <= 0 or maximum < minimum:
            raise ValueError(f"minimum and maximum must satisfy 0 < minimum <= maximum, got {minimum}, {maximum}")
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], got {jitter}")
        self.minimum = minimum
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._random = random_fn
        self.failures = 0

    def base_delay(self) -> float:
        """The delay of the current step before jitter."""
        # The exponent is bounded so that a device offline for weeks cannot overflow a float.
        return min(self.maximum, self.minimum * self.factor ** min(self.failures, 64))

    def next_delay(self) -> float:
        """The delay before the next attempt; each call moves one step up."""
        base = self.base_delay()
        self.failures += 1
        return base * (1 - self.jitter * self._random())

    def reset(self) -> None:
        """Start again from the minimum (after a connection that proved healthy)."""
        self.failures = 0
