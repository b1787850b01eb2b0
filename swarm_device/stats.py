"""Counters of one device client, read by tests, the simulator and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class DeviceStats:
    """Plain counters; they only grow (except `connected`-like state kept by the client)."""

    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    hellos: int = 0
    tasks_succeeded: int = 0
    tasks_failed: int = 0
    tasks_rejected: int = 0
    tasks_canceled: int = 0
    reports_refused: int = 0
    reports_resent: int = 0
    configs_applied: int = 0
    malformed_messages: int = 0
    # Requests a simulated misbehaving device sent without waiting for replies (`--flood`).
    requests_flooded: int = 0

    @property
    def tasks_done(self) -> int:
        """Tasks that ran to a reported final status (succeeded, failed or rejected)."""
        return self.tasks_succeeded + self.tasks_failed + self.tasks_rejected

    def add(self, other: DeviceStats) -> None:
        """Add another device's counters to these (for fleet totals)."""
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
