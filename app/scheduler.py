"""The one list of periodic jobs and their intervals."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from app.dependencies import Runtime
from app.devices import jobs as device_jobs
from app.processes import jobs as process_jobs
from app.tasks import jobs as task_jobs

Job = Callable[[Runtime], Awaitable[None]]


@dataclass(frozen=True)
class PeriodicJob:
    run: Job
    interval_s: float
    # Also once right at start-up (in the background: start-up does not wait for it).
    at_start: bool = False


def periodic_jobs(runtime: Runtime) -> list[PeriodicJob]:
    intervals = runtime.settings.scheduler
    return [
        PeriodicJob(task_jobs.enforce_deadlines, intervals.deadlines_interval_s),
        PeriodicJob(task_jobs.expire_tasks, intervals.expiry_interval_s),
        PeriodicJob(task_jobs.resend_notices, intervals.notices_interval_s),
        PeriodicJob(device_jobs.reconcile_broker, intervals.presence_interval_s, at_start=True),
        PeriodicJob(device_jobs.publish_configs, intervals.configs_interval_s),
        PeriodicJob(process_jobs.advance_steps, intervals.processes_interval_s),
        PeriodicJob(process_jobs.deliver_notifications, intervals.processes_interval_s),
        PeriodicJob(process_jobs.run_triggers, intervals.processes_interval_s),
        PeriodicJob(device_jobs.lift_blocks, intervals.blocks_interval_s),
    ]


def create_scheduler(runtime: Runtime) -> AsyncIOScheduler:
    scheduler = AsyncIOScheduler()
    for job in periodic_jobs(runtime):
        scheduler.add_job(
            job.run,
            "interval",
            args=[runtime],
            seconds=job.interval_s,
            id=f"{job.run.__module__}.{job.run.__name__}",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            **({"next_run_time": datetime.now(UTC)} if job.at_start else {}),
        )
    return scheduler
