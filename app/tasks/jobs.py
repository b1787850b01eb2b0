"""Bodies of the periodic task jobs: thin, safe to run in every replica at once (SKIP LOCKED)."""

from __future__ import annotations

import logging

from app.dependencies import Runtime
from app.tasks import service

log = logging.getLogger(__name__)


async def enforce_deadlines(runtime: Runtime) -> None:
    if count := await service.time_out_overdue(runtime.sessions, runtime.notifier, runtime.failed_rows):
        log.info("%d in-progress tasks passed their deadline", count)


async def expire_tasks(runtime: Runtime) -> None:
    if count := await service.expire_pending(runtime.sessions, runtime.failed_rows):
        log.info("%d pending tasks expired", count)


async def resend_notices(runtime: Runtime) -> None:
    if runtime.notifier.busy:
        # A backlog (a big batch) is older than the retry age but on its way: handing it back
        # would only send it twice. What is due is handed back once this process caught up.
        return
    older_than = runtime.settings.tasks.notice_retry_after_s
    if count := await service.resend_notices(runtime.sessions, runtime.notifier, older_than):
        log.info("re-sending %d notices that were never confirmed", count)
