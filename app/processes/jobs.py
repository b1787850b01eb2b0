"""Bodies of the periodic process jobs: thin, safe in every replica at once (instances are
locked with SKIP LOCKED, notifications leased, the trigger cursor locked)."""

from __future__ import annotations

import logging

import httpx

from app.dependencies import Runtime
from app.processes import delivery, service

log = logging.getLogger(__name__)


def deps_of(runtime: Runtime) -> service.Deps:
    return service.Deps(runtime.sessions, runtime.settings, runtime.notifier)


async def advance_steps(runtime: Runtime) -> None:
    """Device-task steps whose task ended, timers and deadlines that ran out."""
    deps = deps_of(runtime)
    tasks = await service.advance_finished_tasks(deps)
    due = await service.fire_due_steps(deps)
    if tasks or due:
        log.info("process steps advanced: %d on task results, %d on timers and deadlines", tasks, due)


async def deliver_notifications(runtime: Runtime) -> None:
    async with httpx.AsyncClient() as http:
        sent, failed = await delivery.deliver_due(deps_of(runtime), http)
    if sent or failed:
        log.info("process notifications: %d sent, %d failed (retried later)", sent, failed)


async def run_triggers(runtime: Runtime) -> None:
    if started := await service.run_triggers(deps_of(runtime)):
        log.info("triggers started %d process instances", started)
