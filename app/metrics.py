"""Prometheus metrics: one registry and the metrics of the core (served by app/health.py).

Durations are observed in the process where a transition happens (each process exports its
own share; Prometheus sums them). Counts that must agree across processes (tasks by state,
connected devices) are read from the database at scrape time.
"""

from __future__ import annotations

from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func, select

from app.db import Sessions
from app.devices.models import Device
from app.tasks.models import Task
from swarm_device.protocol import TaskStatus

# Process-wide like logging: transitions happen deep in services and consumers, which should not
# have to carry a metrics object around.
REGISTRY = CollectorRegistry()
_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 6 * 3600, 86400)

TASKS = Gauge("swarm_tasks", "Tasks by state (from the database at scrape time).", ["status"], registry=REGISTRY)
DEVICES_CONNECTED = Gauge(
    "swarm_devices_connected", "Devices with an open MQTT connection (from the database).", registry=REGISTRY
)
CREATED_TO_SENT = Histogram(
    "swarm_task_created_to_sent_seconds", "From creation to the confirmed notice.", buckets=_BUCKETS, registry=REGISTRY
)
CREATED_TO_IN_PROGRESS = Histogram(
    "swarm_task_created_to_in_progress_seconds",
    "From creation to being handed out (each attempt).",
    buckets=_BUCKETS,
    registry=REGISTRY,
)
CREATED_TO_FINAL = Histogram(
    "swarm_task_created_to_final_seconds",
    "From creation to a final state.",
    ["status"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
CONSUMER_ERRORS = Counter(
    "swarm_consumer_errors_total", "Device requests whose handler failed unexpectedly.", ["handler"], registry=REGISTRY
)
REQUEST_COPIES = Counter(
    "swarm_device_request_copies_total",
    "Device requests re-sent with an id this process was answering or had answered (not handled again).",
    ["handler"],
    registry=REGISTRY,
)
REQUESTS_LIMITED = Counter(
    "swarm_device_requests_limited_total",
    "Device requests refused or dropped by the per-device limit (only limited devices appear).",
    ["device_id"],
    registry=REGISTRY,
)
DEAD_LETTERED = Counter(
    "swarm_dead_lettered_total", "Device requests parked in the dead-letter queue.", ["handler"], registry=REGISTRY
)


def seconds_between(start: datetime, end: datetime | None) -> float:
    return max((end - start).total_seconds(), 0.0) if end is not None else 0.0


async def exposition(sessions: Sessions) -> bytes:
    """The metrics in Prometheus text format, the database-backed gauges read now."""
    async with sessions() as session:
        by_status = dict((await session.execute(select(Task.status, func.count()).group_by(Task.status))).all())
        connected = await session.scalar(
            select(func.count()).where(Device.online.is_(True), Device.revoked_at.is_(None))
        )
    for status in TaskStatus:
        TASKS.labels(status.value).set(by_status.get(status.value, 0))
    DEVICES_CONNECTED.set(connected or 0)
    return generate_latest(REGISTRY)
