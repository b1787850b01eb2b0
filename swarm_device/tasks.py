"""Running tasks on the device: pull with `tasks/next`, execute one at a time, report the result.

The pull is the source of truth and the push (a `task_queued` notice) only a hint, so the worker
pulls until the core answers `null` every time it is woken, whatever woke it. A result report asks
for the next task too (`next`): a core that hands it out in the reply (`next_task`) saves the
`tasks/next` call after every task; one that does not is asked with `tasks/next` as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from uuid import UUID

import orjson
from pydantic import ValidationError

from swarm_device.protocol import (
    METHOD_TASKS_NEXT,
    ProgressParams,
    ResultParams,
    Task,
    progress_method,
    result_method,
)
from swarm_device.rpc import RpcCallError
from swarm_device.stats import DeviceStats

logger = logging.getLogger(__name__)

# How many finished tasks a worker remembers (see `TaskWorker._outcomes`).
REMEMBERED_OUTCOMES = 64
# What `_report` answers when the core's reply did not say what comes next (pull with
# `tasks/next`), and when the core refused the report.
ASK = object()
REFUSED = object()


class Caller(Protocol):
    """What the worker needs from the RPC layer (`DeviceClient.call` fits)."""

    def __call__(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        until_answered: bool = False,
    ) -> Awaitable[Any]: ...


class TaskRejected(Exception):
    """Raised by a handler that will not run this task; it is reported as `rejected`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TaskContext:
    """What a handler gets: the task and a way to report progress while it runs."""

    def __init__(self, task: Task, call: Caller) -> None:
        self.task = task
        self._call = call

    @property
    def params(self) -> dict[str, Any]:
        """The task's parameters."""
        return self.task.params

    async def progress(self, status_details: dict[str, Any]) -> None:
        """Report progress; the core stores `status_details` and extends the task's deadline.

        Raises `RpcCallError` if the core refuses (e.g. the task is no longer in progress) and
        `RpcTimeoutError` if it does not answer; a handler may ignore both.
        """
        params = ProgressParams(status_details=status_details).model_dump(mode="json")
        await self._call(progress_method(self.task.id), params)


#: A task handler: returns the result dict (or None), raises `TaskRejected` or any error.
TaskHandler = Callable[[TaskContext], Awaitable[dict[str, Any] | None]]


def _failure(exc: BaseException) -> ResultParams:
    return ResultParams(status="failed", error={"type": type(exc).__name__, "message": str(exc)})


async def run_handler(handler: TaskHandler | None, context: TaskContext) -> ResultParams:
    """Run a handler and turn its outcome into the result report (cancellation propagates)."""
    if handler is None:
        return ResultParams(
            status="rejected",
            error={"message": f"no handler for method {context.task.method}"},
        )
    try:
        result = await handler(context)
    except TaskRejected as exc:
        return ResultParams(status="rejected", error={"message": exc.reason})
    except Exception as exc:  # any handler error is the task's failure, whatever it is
        logger.info("task %s (%s) failed: %r", context.task.id, context.task.method, exc)
        return _failure(exc)
    if result is not None and not isinstance(result, dict):
        return _failure(TypeError(f"handler returned {type(result).__name__}, not a dict or None"))
    try:
        # Checked here so that an unserialisable result fails the task instead of the worker.
        orjson.dumps(result)
    except TypeError as exc:
        return _failure(exc)
    return ResultParams(status="succeeded", result=result)


class TaskWorker:
    """Pulls and runs the device's tasks, one at a time, for as long as the client runs.

    It does not depend on the connection: a handler keeps running through a reconnect and its
    result is reported once the device is back (the calls wait for a connection).
    """

    def __init__(self, call: Caller, stats: DeviceStats, *, device_id: str = "", ask_next: bool = True) -> None:
        self._call = call
        self._ask_next = ask_next
        self._stats = stats
        self._device_id = device_id
        self.handlers: dict[str, TaskHandler] = {}
        self._pull_requested = asyncio.Event()
        self._running: tuple[Task, asyncio.Task[ResultParams]] | None = None
        # Outcomes of the last tasks run, by (task id, attempt): a re-issued attempt is
        # answered from here. A new attempt (after a deadline) has a new number and runs again.
        self._outcomes: OrderedDict[tuple[UUID, int], ResultParams] = OrderedDict()

    @property
    def running(self) -> Task | None:
        """The task whose handler is running now, if any."""
        return self._running[0] if self._running is not None else None

    def add_handler(self, method: str, handler: TaskHandler) -> None:
        """Register the handler of a task method (replacing any previous one)."""
        self.handlers[method] = handler

    def request_pull(self) -> None:
        """Ask for a `tasks/next` round; requests made while one runs coalesce into one more."""
        self._pull_requested.set()

    def cancel(self, task_id: UUID) -> bool:
        """Cancel the running handler if it runs `task_id`; its result is then not reported."""
        if self._running is None or self._running[0].id != task_id:
            return False
        logger.info("%s: task %s canceled by the core", self._device_id, task_id)
        self._running[1].cancel()
        return True

    async def run(self) -> None:
        """Serve pull requests until cancelled."""
        while True:
            await self._pull_requested.wait()
            self._pull_requested.clear()
            try:
                await self.pull()
            except Exception:
                # A bug in one round must not end the device's task processing.
                logger.exception("%s: task pull failed", self._device_id)

    async def pull(self) -> int:
        """Call `tasks/next` and run what it hands out until it answers null; returns the count."""
        executed = 0
        resent: set[UUID] = set()
        handed: Any = ASK  # what a result's reply handed out next (a task or None), else ASK
        while True:
            if handed is ASK:
                try:
                    raw = await self._call(METHOD_TASKS_NEXT, until_answered=True)
                except RpcCallError as exc:
                    logger.warning("%s: tasks/next refused: %s", self._device_id, exc)
                    return executed
            else:
                raw = handed
            if raw is None:
                return executed
            try:
                task = Task.model_validate(raw)
            except ValidationError as exc:
                self._stats.malformed_messages += 1
                logger.error("%s: tasks/next answered a malformed task: %s", self._device_id, exc)
                return executed
            outcome = self._outcomes.get((task.id, task.attempt))
            if outcome is not None:
                # Handed back after this device finished it: the report was lost or not
                # recorded. Send the same report again rather than running the task twice; a
                # core that keeps doing it ends the round instead of spinning the device.
                if task.id in resent:
                    logger.warning("%s: task %s handed out again after its report", self._device_id, task.id)
                    return executed
                resent.add(task.id)
                self._stats.reports_resent += 1
                handed = await self._report(task, outcome, count=False)
            else:
                executed += 1
                handed = await self.execute(task)
            if handed is REFUSED:
                # The core refused the report; pulling again at once could hand the same task
                # back in a tight loop. The next notice or reconnect pulls again.
                return executed

    async def execute(self, task: Task) -> Any:
        """Run one task and report its result; returns what `_report` returns (ASK if canceled)."""
        context = TaskContext(task, self._call)
        job = asyncio.create_task(run_handler(self.handlers.get(task.method), context), name=f"task-{task.id}")
        self._running = (task, job)
        try:
            await asyncio.wait({job})
        except asyncio.CancelledError:
            job.cancel()
            raise
        finally:
            self._running = None
        if job.cancelled():
            # The core made it CANCELED already; a report would only be refused.
            self._stats.tasks_canceled += 1
            return ASK
        outcome = job.result()
        self._outcomes[(task.id, task.attempt)] = outcome
        while len(self._outcomes) > REMEMBERED_OUTCOMES:
            self._outcomes.popitem(last=False)
        return await self._report(task, outcome)

    async def _send_report(self, task: Task, outcome: ResultParams) -> Any:
        params = outcome.model_copy(update={"next": self._ask_next}).model_dump(mode="json")
        return await self._call(result_method(task.id), params, until_answered=True)

    async def _report(self, task: Task, outcome: ResultParams, *, count: bool = True) -> Any:
        """Report a result, asking for the next task: REFUSED if the core refused the report,
        else the next task the reply handed out (None: none), or ASK if it handed out nothing."""
        try:
            try:
                answer = await self._send_report(task, outcome)
            except RpcCallError as exc:
                if not (self._ask_next and exc.code == "invalid" and "next" in exc.message):
                    raise
                # A core from before `next` refuses the field it does not know: report as before.
                logger.info("%s: the core does not hand out tasks with results; pulling instead", self._device_id)
                self._ask_next = False
                answer = await self._send_report(task, outcome)
        except RpcCallError as exc:
            self._stats.reports_refused += 1
            logger.warning("%s: result of task %s refused: %s", self._device_id, task.id, exc)
            return REFUSED
        if count:
            if outcome.status == "succeeded":
                self._stats.tasks_succeeded += 1
            elif outcome.status == "failed":
                self._stats.tasks_failed += 1
            else:
                self._stats.tasks_rejected += 1
        # A core that does not know `next` (or an odd answer): pull with tasks/next as before.
        return answer["next_task"] if isinstance(answer, dict) and "next_task" in answer else ASK
