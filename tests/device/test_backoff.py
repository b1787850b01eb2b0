from __future__ import annotations

import pytest

from swarm_device.backoff import Backoff


def test_delays_double_up_to_the_maximum_without_jitter() -> None:
    backoff = Backoff(1.0, 10.0, jitter=0.0)
    assert [backoff.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_jitter_draws_from_the_upper_part_of_each_step() -> None:
    # random() == 0 keeps the full step, random() -> 1 takes away `jitter` of it.
    assert Backoff(2.0, 60.0, jitter=0.5, random_fn=lambda: 0.0).next_delay() == 2.0
    assert Backoff(2.0, 60.0, jitter=0.5, random_fn=lambda: 1.0).next_delay() == 1.0
    backoff = Backoff(1.0, 60.0, jitter=0.5)
    for step in range(8):
        base = min(60.0, 2.0**step)
        assert base / 2 <= backoff.next_delay() <= base


def test_reset_starts_again_from_the_minimum() -> None:
    backoff = Backoff(0.5, 30.0, jitter=0.0)
    for _ in range(5):
        backoff.next_delay()
    assert backoff.base_delay() == 16.0
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_very_many_failures_do_not_overflow() -> None:
    backoff = Backoff(1.0, 60.0, jitter=0.0)
    backoff.failures = 10_000
    assert backoff.next_delay() == 60.0


@pytest.mark.parametrize(
    ("minimum", "maximum", "factor", "jitter"),
    [(0.0, 1.0, 2.0, 0.5), (2.0, 1.0, 2.0, 0.5), (1.0, 2.0, 0.5, 0.5), (1.0, 2.0, 2.0, 1.5)],
)
def test_invalid_parameters_are_refused(minimum: float, maximum: float, factor: float, jitter: float) -> None:
    with pytest.raises(ValueError, match="must"):
        Backoff(minimum, maximum, factor=factor, jitter=jitter)
