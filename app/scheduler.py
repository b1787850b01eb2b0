"""The one list of periodic jobs and their intervals."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from app.dependencies import Runtime
from app.devices import jobs as device_jobs
from app.tasks import jobs as task_jobs

Job = Callable[[Runtime], Awaitable[None]]


def periodic_jobs(runtime: Runtime) -> list[tuple[Job, float]]:
    intervals = runtime.settings.scheduler
    return [
        (task_jobs.enforce_deadlines, intervals.deadlines_interval_s),
        (task_jobs.expire_tasks, intervals.expiry_interval_s),
        (task_jobs.resend_notices, intervals.notices_interval_s),
        (device_jobs.reconcile_presence, intervals.presence_interval_s),
        (device_jobs.publish_configs, intervals.configs_interval_s),
    ]


def create_scheduler(runtime: Runtime) -> AsyncIOScheduler:
    scheduler = AsyncIOScheduler()
    for job, interval_s in periodic_jobs(runtime):
        scheduler.add_job(
            job,
            "interval",
            args=[runtime],
            seconds=interval_s,
            id=f"{job.__module__}.{job.__name__}",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
    return scheduler
