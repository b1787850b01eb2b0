from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from swarm_device.protocol import Task
from swarm_device.rpc import RpcCallError
from swarm_device.stats import DeviceStats
from swarm_device.tasks import TaskContext, TaskRejected, TaskWorker, run_handler


def task_dict(method: str = "echo", params: dict[str, Any] | None = None) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat()
    return {
        "id": str(uuid.uuid4()),
        "device_id": "dev-1",
        "method": method,
        "params": params or {},
        "status": "in_progress",
        "priority": 0,
        "attempt": 1,
        "max_attempts": 3,
        "version": 2,
        "created_at": now,
        "updated_at": now,
    }


class FakeCore:
    """Answers the worker's calls: `tasks/next` from a queue, everything else with `{}` (a core
    that does not know `next`); `hands_out_next`: a result asking for `next` gets the next task of
    the queue (or null) as `next_task`."""

    def __init__(self, *tasks: dict[str, Any], hands_out_next: bool = False) -> None:
        self.queue = list(tasks)
        self.hands_out_next = hands_out_next
        self.calls: list[tuple[str, dict[str, Any] | None, bool]] = []
        self.on_call: Callable[[str], None] | None = None
        self.refuse_results = False

    async def __call__(self, method: str, params: dict[str, Any] | None = None, *, until_answered: bool = False) -> Any:
        self.calls.append((method, params, until_answered))
        if self.on_call is not None:
            self.on_call(method)
        await asyncio.sleep(0)
        if method == "tasks/next":
            return self.queue.pop(0) if self.queue else None
        if method.endswith("/result") and self.refuse_results:
            raise RpcCallError("conflict", "task is not in progress")
        if method.endswith("/result") and self.hands_out_next and params and params.get("next"):
            return {"status": params["status"], "next_task": self.queue.pop(0) if self.queue else None}
        return {}

    def results(self) -> list[tuple[str, dict[str, Any] | None]]:
        return [(m, p) for m, p, _ in self.calls if m.endswith("/result")]


def context(method: str = "echo", params: dict[str, Any] | None = None) -> TaskContext:
    return TaskContext(Task.model_validate(task_dict(method, params)), FakeCore())


@pytest.mark.asyncio
async def test_handler_outcomes_map_to_reports() -> None:
    async def ok(ctx: TaskContext) -> dict[str, Any]:
        return {"echo": ctx.params}

    async def nothing(ctx: TaskContext) -> None:
        return None

    async def refuse(ctx: TaskContext) -> None:
        raise TaskRejected("busy")

    async def crash(ctx: TaskContext) -> None:
        raise KeyError("disk")

    async def wrong_type(ctx: TaskContext) -> Any:
        return [1, 2]

    async def unserialisable(ctx: TaskContext) -> dict[str, Any]:
        return {"x": object()}

    ctx = context(params={"a": 1})
    assert (await run_handler(ok, ctx)).model_dump() == {
        "status": "succeeded",
        "result": {"echo": {"a": 1}},
        "error": None,
        "next": False,
    }
    assert (await run_handler(nothing, ctx)).status == "succeeded"
    rejected = await run_handler(refuse, ctx)
    assert (rejected.status, rejected.error) == ("rejected", {"message": "busy"})
    failed = await run_handler(crash, ctx)
    assert (failed.status, failed.error) == ("failed", {"type": "KeyError", "message": "'disk'"})
    assert (await run_handler(wrong_type, ctx)).error == {
        "type": "TypeError",
        "message": "handler returned list, not a dict or None",
    }
    assert (await run_handler(unserialisable, ctx)).status == "failed"


@pytest.mark.asyncio
async def test_unknown_method_is_rejected() -> None:
    outcome = await run_handler(None, context("format-disk"))
    assert outcome.status == "rejected"
    assert outcome.error == {"message": "no handler for method format-disk"}


@pytest.mark.asyncio
async def test_pull_runs_tasks_until_null_and_reports_each() -> None:
    first, second, third = task_dict("echo", {"v": 1}), task_dict("nope"), task_dict("echo")
    core = FakeCore(first, second, third)
    stats = DeviceStats()
    worker = TaskWorker(core, stats)

    async def echo(ctx: TaskContext) -> dict[str, Any]:
        return ctx.params

    worker.add_handler("echo", echo)
    assert await worker.pull() == 3
    assert [m for m, _, _ in core.calls] == [
        "tasks/next",
        f"tasks/{first['id']}/result",
        "tasks/next",
        f"tasks/{second['id']}/result",
        "tasks/next",
        f"tasks/{third['id']}/result",
        "tasks/next",
    ]
    # tasks/next and result reports are retried until answered.
    assert all(until for _, _, until in core.calls)
    # Every report asks for the next task; this core does not know `next`, so the device pulls.
    assert core.results()[0][1] == {"status": "succeeded", "result": {"v": 1}, "error": None, "next": True}
    assert core.results()[1][1] == {
        "status": "rejected",
        "result": None,
        "error": {"message": "no handler for method nope"},
        "next": True,
    }
    assert (stats.tasks_succeeded, stats.tasks_rejected, stats.tasks_done) == (2, 1, 3)


@pytest.mark.asyncio
async def test_a_result_reply_that_hands_out_the_next_task_saves_the_pulls() -> None:
    first, second = task_dict("echo", {"v": 1}), task_dict("echo", {"v": 2})
    core = FakeCore(first, second, hands_out_next=True)
    stats = DeviceStats()
    worker = TaskWorker(core, stats)

    async def echo(ctx: TaskContext) -> dict[str, Any]:
        return ctx.params

    worker.add_handler("echo", echo)
    assert await worker.pull() == 2
    # One pull; the first report's reply hands out the second task, the second's says none is left.
    assert [m for m, _, _ in core.calls] == [
        "tasks/next",
        f"tasks/{first['id']}/result",
        f"tasks/{second['id']}/result",
    ]
    assert [p["result"] for _, p in core.results() if p] == [{"v": 1}, {"v": 2}]
    assert stats.tasks_succeeded == 2


@pytest.mark.asyncio
async def test_refused_report_stops_the_round() -> None:
    core = FakeCore(task_dict("echo"), task_dict("echo"))
    core.refuse_results = True
    stats = DeviceStats()
    worker = TaskWorker(core, stats)
    assert await worker.pull() == 1
    assert stats.reports_refused == 1
    assert len(core.queue) == 1


@pytest.mark.asyncio
async def test_malformed_task_is_counted_and_skipped() -> None:
    core = FakeCore({"id": "not-a-task"})
    stats = DeviceStats()
    assert await TaskWorker(core, stats).pull() == 0
    assert stats.malformed_messages == 1
    assert core.results() == []


@pytest.mark.asyncio
async def test_canceled_task_is_not_reported() -> None:
    task = task_dict("slow")
    core = FakeCore(task)
    stats = DeviceStats()
    worker = TaskWorker(core, stats)
    started = asyncio.Event()

    async def slow(ctx: TaskContext) -> None:
        started.set()
        await asyncio.sleep(60)

    worker.add_handler("slow", slow)
    pull = asyncio.create_task(worker.pull())
    await started.wait()
    assert worker.running is not None
    assert not worker.cancel(uuid.uuid4())  # not the running task: ignored
    assert worker.cancel(uuid.UUID(task["id"]))
    assert await pull == 1
    assert core.results() == []
    assert stats.tasks_canceled == 1
    assert worker.running is None


@pytest.mark.asyncio
async def test_pull_requests_during_a_round_coalesce_into_one_more() -> None:
    core = FakeCore(task_dict("echo"))
    worker = TaskWorker(core, DeviceStats())

    def notices_arrive(method: str) -> None:
        if method.endswith("/result"):
            for _ in range(3):
                worker.request_pull()

    core.on_call = notices_arrive
    runner = asyncio.create_task(worker.run())
    worker.request_pull()
    for _ in range(50):
        await asyncio.sleep(0)
    runner.cancel()
    nexts = [m for m, _, _ in core.calls if m == "tasks/next"]
    # Round 1: next -> task, next -> null; three notices meanwhile: exactly one more round.
    assert len(nexts) == 3


@pytest.mark.asyncio
async def test_progress_is_sent_for_the_running_task() -> None:
    task = task_dict("update")
    core = FakeCore(task)
    worker = TaskWorker(core, DeviceStats())

    async def update(ctx: TaskContext) -> dict[str, Any]:
        await ctx.progress({"percent": 50})
        return {"done": True}

    worker.add_handler("update", update)
    await worker.pull()
    assert (f"tasks/{task['id']}/progress", {"status_details": {"percent": 50}}, False) in core.calls


@pytest.mark.asyncio
async def test_a_task_handed_back_after_its_report_is_not_run_twice() -> None:
    task = task_dict("echo", {"v": 1})
    core = FakeCore(task, task, task)  # a core that keeps handing out the finished task
    stats = DeviceStats()
    worker = TaskWorker(core, stats)
    runs = 0

    async def echo(ctx: TaskContext) -> dict[str, Any]:
        nonlocal runs
        runs += 1
        return ctx.params

    worker.add_handler("echo", echo)
    assert await worker.pull() == 1
    assert runs == 1
    # The first repeat gets the same report again; the second ends the round.
    assert [p for _, p in core.results()] == [
        {"status": "succeeded", "result": {"v": 1}, "error": None, "next": True}
    ] * 2
    assert (stats.tasks_succeeded, stats.reports_resent) == (1, 1)

    # A new attempt of the same task (re-queued after its deadline) runs again.
    core.queue.append({**task, "attempt": 2})
    assert await worker.pull() == 1
    assert runs == 2


@pytest.mark.asyncio
async def test_a_core_that_refuses_next_gets_the_report_without_it_and_the_device_pulls() -> None:
    task = task_dict("echo")
    core = FakeCore(task)

    async def refuse_next(method: str, params: dict[str, Any] | None = None, *, until_answered: bool = False) -> Any:
        if method.endswith("/result") and params and params.get("next"):
            core.calls.append((method, params, until_answered))
            raise RpcCallError("invalid", "next: Extra inputs are not permitted")
        return await FakeCore.__call__(core, method, params, until_answered=until_answered)

    stats = DeviceStats()
    worker = TaskWorker(refuse_next, stats)

    async def echo(ctx: TaskContext) -> dict[str, Any]:
        return ctx.params

    worker.add_handler("echo", echo)
    assert await worker.pull() == 1
    assert [(m, p["next"]) for m, p in core.results() if p] == [
        (f"tasks/{task['id']}/result", v) for v in (True, False)
    ]
    assert [m for m, _, _ in core.calls][-1] == "tasks/next"
    assert (stats.tasks_succeeded, stats.reports_refused) == (1, 0)
