"""The benchmark's table says which commit it measured and warns when the box was busy before it."""

from __future__ import annotations

from typing import Any

import pytest

from bench.__main__ import print_table


def results(busy_pct: float, *, dirty: bool) -> dict[str, Any]:
    box = {"cpu_busy_pct": busy_pct, "sample_s": 2.0, "threshold_pct": 25.0, "busy": busy_pct > 25.0}
    meta = {
        "commit": "0123456789abcdef0123456789abcdef01234567",
        "commit_dirty": dirty,
        "command": "python -m bench --sections raw,intake",
        "loadavg_start": (3.5, 2.0, 1.0),
        "box_before": box,
    }
    return {"meta": meta}


def test_a_busy_box_is_warned_about(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(results(61.5, dirty=True))
    out = capsys.readouterr().out
    assert "commit 0123456 (uncommitted changes): python -m bench --sections raw,intake" in out
    assert "processors 61.5% busy over the 2 s before the run (load average 3.50)" in out
    assert "WARNING: the box was busy before the run (61.5% > 25%)" in out


def test_a_quiet_box_is_not(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(results(4.0, dirty=False))
    out = capsys.readouterr().out
    assert "commit 0123456: python -m bench" in out
    assert "processors 4.0% busy" in out
    assert "WARNING" not in out
