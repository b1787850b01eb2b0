"""The notifier's lanes and bulk leases, as pure bookkeeping (nothing is published)."""

from __future__ import annotations

import uuid
from typing import Any, cast

from app.tasks.notifier import BULK_NOTICES_FLOOR_PER_S, Lanes, Notifier, PendingNotice


def notices(count: int) -> list[PendingNotice]:
    return [PendingNotice(uuid.uuid4(), "dev-1", "task_queued") for _ in range(count)]


def test_a_full_bulk_lane_refuses_what_is_not_leased_and_never_a_single_task() -> None:
    lanes = Lanes(max_pending=2)
    assert lanes.put(notices(3), bulk=True) == 1
    # Leased notices fitted when their lease was set; a batch in flight meanwhile filled the lane.
    assert lanes.put(notices(2), bulk=True, leased=True) == 0
    assert lanes.put(notices(1), bulk=False) == 0
    assert (lanes.waiting(), lanes.bulk_waiting(), lanes.bulk_room()) == (5, 4, -2)


def test_a_bulk_lease_covers_the_lane_ahead_and_is_none_for_an_overflow() -> None:
    notifier = Notifier(cast(Any, None), cast(Any, None), max_pending=1_000)
    notifier.tasks_queued_in_bulk((n.task_id, n.device_id) for n in notices(400))
    assert notifier.bulk_lease_s(600) == 1_000 / BULK_NOTICES_FLOOR_PER_S
    # They would not all fit: the overflow is for any process's re-send job at once.
    assert notifier.bulk_lease_s(601) == 0.0
