"""The conformance kit: drives one real device through the protocol's rules against a running stack.

The kit acts only from outside the device: it creates tasks through the HTTP API, cancels them,
closes the device's connection through the broker's management API, publishes duplicate and
malformed messages to the device's down-topics, and watches what the device publishes through an
AMQP tap (app/conformance/tap.py). Each rule says pass or fail and what it saw. The device under
test must run the task methods `echo` (result = params) and `sleep` (`params.seconds`, progress
every `params.progress_interval` seconds), as the SDK's simulator and examples/devices do.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from app.conformance.tap import DeviceTap, Seen
from app.devices.broker_admin import BrokerAdmin
from app.settings import BrokerSettings
from swarm_device import protocol
from swarm_device.protocol import Notice, TaskStatus

KICK_REASON = "conformance kit: reconnect"
PENDING = {TaskStatus.QUEUED, TaskStatus.SENT}
ACTIVE = {*PENDING, TaskStatus.IN_PROGRESS}
POLL_S = 0.25
T = TypeVar("T")


@dataclass
class RuleResult:
    rule: str
    passed: bool | None  # None: skipped
    saw: list[str]


@dataclass
class Kit:
    """One run against one device. `api` is a client of the core's /api/v1 with a token."""

    api: httpx.AsyncClient
    tap: DeviceTap
    admin: BrokerAdmin
    device_id: str
    within_s: float = 60.0  # how long the device gets for each step
    quiet_s: float = 5.0  # how long the kit watches for something that must not happen
    step_timeout_s: int = 5  # the step timeout of the progress rule's task
    broker_restart: str | None = None  # a shell command that restarts the broker (optional rule)
    created: list[str] = field(default_factory=list)

    # -- what the kit does ------------------------------------------------------------------

    async def create(self, method: str, params: dict[str, Any], **options: Any) -> str:
        response = await self.api.post(
            f"/devices/{self.device_id}/tasks", json={"method": method, "params": params, **options}
        )
        response.raise_for_status()
        task_id: str = response.json()["id"]
        self.created.append(task_id)
        return task_id

    async def task(self, task_id: str) -> dict[str, Any]:
        response = await self.api.get(f"/tasks/{task_id}")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def final(self, task_id: str, within_s: float) -> dict[str, Any]:
        """The task once final, or as it is after `within_s`."""
        response = await self.api.get(f"/tasks/{task_id}", params={"wait": max(1, round(within_s))})
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def in_progress(self, task_id: str) -> dict[str, Any]:
        """The task once the device took it (or as it is after `within_s`)."""
        return await self.poll(lambda: self.task(task_id), lambda task: task["status"] not in PENDING)

    async def poll(self, probe: Callable[[], Awaitable[T]], done: Callable[[T], bool]) -> T:
        """Probe until `done` says so or `within_s` passed; the last value either way."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.within_s
        while True:
            value = await probe()
            if done(value) or loop.time() > until:
                return value
            await asyncio.sleep(POLL_S)

    async def kick(self) -> int:
        """Close the device's connections: it must reconnect by itself."""
        return await self.admin.close_device_connections(self.device_id, KICK_REASON)

    async def cancel_leftovers(self) -> None:
        """Cancel the kit's tasks that are not final, so that one rule's failure does not spill into the next."""
        for task_id in self.created:
            if (await self.task(task_id))["status"] in ACTIVE:
                await self.api.post(f"/tasks/{task_id}/cancel")

    async def echo_round(self, saw: list[str]) -> bool:
        """An echo task created now must come back succeeded with its params as the result."""
        params = {"conformance": uuid.uuid4().hex}
        task_id = await self.create("echo", params)
        task = await self.final(task_id, self.within_s)
        passed = task["status"] == TaskStatus.SUCCEEDED and task.get("result") == params
        saw.append(f"echo task {task_id}: {task['status']}, result {task.get('result')}")
        return passed

    # -- what the kit watches ---------------------------------------------------------------

    def calls(self, method: str) -> Callable[[Seen], bool]:
        return lambda seen: seen.method == method

    def reports(self, task_id: str) -> Callable[[Seen], bool]:
        return lambda seen: seen.method in (protocol.result_method(task_id), protocol.progress_method(task_id))

    def result_requests(self, task_id: str, after: int = 0) -> set[str | None]:
        """Distinct request ids of the device's results for the task: a resend keeps its id, a rerun does not."""
        method = protocol.result_method(task_id)
        return {seen.request_id for seen in self.tap.since(after, lambda seen: seen.method == method)}

    def elapsed(self, seen: Seen | None, since: float) -> str:
        return "never" if seen is None else f"after {seen.at - since:.1f} s"


# -- the rules, in the order they run --------------------------------------------------------


async def connected(kit: Kit) -> RuleResult:
    """The device is connected to the broker (every other rule needs it)."""
    count = await kit.poll(lambda: kit.admin.device_connection_count(kit.device_id), lambda n: n > 0)
    return RuleResult("connected", count > 0, [f"{count} broker connection(s) of user {kit.device_id}"])


async def pull_on_connect(kit: Kit) -> RuleResult:
    """On every (re)connect: hello, then tasks/next."""
    start, loop = kit.tap.mark(), asyncio.get_running_loop()
    at = loop.time()
    closed = await kit.kick()
    # A device still busy with its start-up when kicked may pull once more for its earlier hello.
    hello = await kit.tap.wait_for(kit.calls(protocol.METHOD_HELLO), start, kit.within_s)
    pulled = None
    if hello is not None:
        after_hello = hello.at
        is_pull = kit.calls(protocol.METHOD_TASKS_NEXT)
        pulled = await kit.tap.wait_for(lambda s: is_pull(s) and s.at >= after_hello, start, kit.within_s)
    saw = [
        f"closed {closed} connection(s)",
        f"hello {kit.elapsed(hello, at)}",
        f"tasks/next {kit.elapsed(pulled, at)}",
    ]
    passed = hello is not None and pulled is not None and hello.at <= pulled.at
    return RuleResult("pull-on-connect", passed, saw)


# How long the device must have sent and received nothing before a rule that watches for a pull.
SETTLE_S = 1.0


async def notice_then_pull(kit: Kit) -> RuleResult:
    """A task_queued notice makes the device pull, run the task and report it."""
    # A pull still under way (the device pulls until null after each report) would take the task
    # before its notice: create it only once the device has gone quiet.
    await kit.tap.quiet_for(SETTLE_S, within_s=kit.quiet_s)
    start, loop = kit.tap.mark(), asyncio.get_running_loop()
    at = loop.time()
    params = {"conformance": uuid.uuid4().hex}
    task_id = await kit.create("echo", params)
    expected = Notice(event="task_queued", task_id=uuid.UUID(task_id)).model_dump(mode="json")
    notify = protocol.notify_topic(kit.device_id)
    notice = await kit.tap.wait_for(lambda s: s.topic == notify and s.json == expected, start, kit.within_s)
    task = await kit.final(task_id, kit.within_s)
    pulled = next(iter(kit.tap.since(start, kit.calls(protocol.METHOD_TASKS_NEXT))), None)
    saw = [
        f"task {task_id} created; notice {kit.elapsed(notice, at)}",
        f"tasks/next {kit.elapsed(pulled, at)}",
        f"task {task['status']}, result {task.get('result')}",
    ]
    passed = (
        notice is not None
        and pulled is not None
        and task["status"] == TaskStatus.SUCCEEDED
        and task.get("result") == params
    )
    return RuleResult("notice-then-pull", passed, saw)


async def duplicate_notice(kit: Kit) -> RuleResult:
    """Copies of a finished task's notice only make the device pull (null); it reports nothing again."""
    saw: list[str] = []
    if not await kit.echo_round(saw):
        return RuleResult("duplicate-notice", False, saw)
    task_id = kit.created[-1]
    before = await kit.task(task_id)
    start = kit.tap.mark()
    notice = Notice(event="task_queued", task_id=uuid.UUID(task_id)).model_dump_json().encode()
    for _ in range(2):
        await kit.tap.publish(protocol.notify_topic(kit.device_id), notice)
    await asyncio.sleep(kit.quiet_s)
    pulls = kit.tap.since(start, kit.calls(protocol.METHOD_TASKS_NEXT))
    reports = kit.tap.since(start, kit.reports(task_id))
    after = await kit.task(task_id)
    saw += [
        f"2 copies of the notice of {task_id} published; the device pulled {len(pulls)} time(s)",
        f"{len(reports)} report(s) of the task after the copies; version {before['version']} -> {after['version']}",
    ]
    passed = bool(pulls) and not reports and after["version"] == before["version"]
    return RuleResult("duplicate-notice", passed and await kit.echo_round(saw), saw)


# Malformed messages on each down-topic: not JSON, the wrong shape, unknown values.
MALFORMED: tuple[tuple[Callable[[str], str], bytes], ...] = (
    (protocol.notify_topic, b"\xff\xfe not json"),
    (protocol.notify_topic, b"[1, 2, 3]"),
    (protocol.notify_topic, b'{"event": "task_queued"}'),
    (protocol.notify_topic, b'{"event": "self_destruct", "task_id": "00000000-0000-0000-0000-000000000000"}'),
    (protocol.reply_topic, b"{"),
    (protocol.reply_topic, b'{"id": "nobody-asked", "result": 42}'),
    (protocol.reply_topic, b'"just a string"'),
    (protocol.config_topic, b"not a configuration"),
)


async def malformed_messages(kit: Kit) -> RuleResult:
    """Malformed messages on the down-topics are ignored: the device stays connected and keeps working."""
    start = kit.tap.mark()
    for topic, body in MALFORMED:
        await kit.tap.publish(topic(kit.device_id), body)
    saw = [f"{len(MALFORMED)} malformed messages published on the device's down-topics"]
    worked = await kit.echo_round(saw)
    hellos = kit.tap.since(start, kit.calls(protocol.METHOD_HELLO))
    saw.append(f"{len(hellos)} hello(s) since (a hello means the device reconnected)")
    return RuleResult("malformed-messages", worked and not hellos, saw)


async def progress_within_step_timeout(kit: Kit) -> RuleResult:
    """A task longer than its step timeout succeeds when progress comes within every step timeout."""
    step = kit.step_timeout_s
    params = {"seconds": step * 2.5, "progress_interval": step / 5}
    start = kit.tap.mark()
    task_id = await kit.create("sleep", params, timeout_s=step, max_attempts=1)
    task = await kit.final(task_id, kit.within_s + params["seconds"])
    progress = kit.tap.since(start, lambda s: s.method == protocol.progress_method(task_id))
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(progress)]
    saw = [
        f"sleep task {task_id}: {params['seconds']} s with a step timeout of {step} s",
        f"{len(progress)} progress report(s), the longest gap {max(gaps, default=0):.1f} s",
        f"task {task['status']} at attempt {task['attempt']}",
    ]
    passed = task["status"] == TaskStatus.SUCCEEDED and task["attempt"] == 1
    return RuleResult("progress-within-step-timeout", passed, saw)


async def resume_after_reconnect(kit: Kit) -> RuleResult:
    """Connection lost during a task: the device finishes that task once (one result, no second run)."""
    params = {"seconds": 6, "progress_interval": 1}
    start = kit.tap.mark()
    task_id = await kit.create("sleep", params, timeout_s=round(kit.within_s), max_attempts=1)
    taken = await kit.in_progress(task_id)
    saw = [f"sleep task {task_id} {taken['status']}"]
    if taken["status"] != TaskStatus.IN_PROGRESS:
        return RuleResult("resume-after-reconnect", False, saw)
    kicked = kit.tap.mark()
    saw.append(f"closed {await kit.kick()} connection(s) while it ran")
    task = await kit.final(task_id, kit.within_s + params["seconds"])
    await asyncio.sleep(kit.quiet_s)  # a second run would report after the first
    results = kit.result_requests(task_id, start)
    hello = next(iter(kit.tap.since(kicked, kit.calls(protocol.METHOD_HELLO))), None)
    saw += [
        f"reconnected: {'yes' if hello else 'no hello seen'}",
        f"task {task['status']} at attempt {task['attempt']}; {len(results)} distinct result request(s)",
    ]
    passed = task["status"] == TaskStatus.SUCCEEDED and task["attempt"] == 1 and len(results) == 1
    return RuleResult("resume-after-reconnect", passed and hello is not None, saw)


async def cancel(kit: Kit) -> RuleResult:
    """A task_canceled notice stops the task: no report of it afterwards; the device takes the next task."""
    params = {"seconds": round(kit.within_s), "progress_interval": 1}
    task_id = await kit.create("sleep", params, timeout_s=round(kit.within_s) * 2, max_attempts=1)
    taken = await kit.in_progress(task_id)
    saw = [f"sleep task {task_id} {taken['status']}"]
    if taken["status"] != TaskStatus.IN_PROGRESS:
        return RuleResult("cancel", False, saw)
    # Marked before the request: the core may send the notice before its answer reaches us.
    start, at = kit.tap.mark(), asyncio.get_running_loop().time()
    response = await kit.api.post(f"/tasks/{task_id}/cancel")
    notify = protocol.notify_topic(kit.device_id)
    notice = await kit.tap.wait_for(lambda s: s.topic == notify and "task_canceled" in str(s.json), start, 10)
    # A report already on its way when the notice arrived is fine; one after a second is not.
    await asyncio.sleep(kit.quiet_s)
    late = [s for s in kit.tap.since(start, kit.reports(task_id)) if notice is None or s.at > notice.at + 1.0]
    saw += [
        f"canceled ({response.status_code}); notice {kit.elapsed(notice, at)}",
        f"{len(late)} report(s) of the task more than 1 s after the notice",
    ]
    passed = response.status_code == 200 and notice is not None and not late
    return RuleResult("cancel", passed and await kit.echo_round(saw), saw)


async def broker_restart(kit: Kit) -> RuleResult:
    """After the broker restarts, the device reconnects by itself and takes a new task."""
    if kit.broker_restart is None:
        return RuleResult("broker-restart", None, ["skipped: no --broker-restart command given"])
    process = await asyncio.create_subprocess_shell(kit.broker_restart)
    code = await asyncio.wait_for(process.wait(), 300)
    saw = [f"`{kit.broker_restart}` exited with {code}"]
    return RuleResult("broker-restart", code == 0 and await kit.echo_round(saw), saw)


async def never_twice(kit: Kit) -> RuleResult:
    """Over the whole run: no task got results under two request ids (a resend keeps its id)."""
    twice = {task_id: n for task_id in kit.created if (n := len(kit.result_requests(task_id))) > 1}
    saw = [f"{len(kit.created)} tasks created; reported under several request ids: {twice or 'none'}"]
    return RuleResult("never-twice", not twice, saw)


Rule = Callable[[Kit], Awaitable[RuleResult]]
RULES: dict[str, Rule] = {
    "connected": connected,
    "pull-on-connect": pull_on_connect,
    "notice-then-pull": notice_then_pull,
    "duplicate-notice": duplicate_notice,
    "malformed-messages": malformed_messages,
    "progress-within-step-timeout": progress_within_step_timeout,
    "resume-after-reconnect": resume_after_reconnect,
    "cancel": cancel,
    "broker-restart": broker_restart,
    "never-twice": never_twice,
}


async def run(kit: Kit, rules: list[str] | None = None) -> list[RuleResult]:
    """Run the rules (default: all) in order; `connected` first, whatever was asked."""
    names = list(RULES) if not rules else ["connected", *(name for name in RULES if name in rules)]
    results: list[RuleResult] = []
    for name in dict.fromkeys(names):
        try:
            result = await RULES[name](kit)
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            result = RuleResult(name, False, [f"the kit failed: {exc!r}"])
        results.append(result)
        await kit.cancel_leftovers()
        if name == "connected" and not result.passed:
            break
    return results


async def check_device(
    broker: BrokerSettings, api: httpx.AsyncClient, device_id: str, rules: list[str] | None = None, **options: Any
) -> list[RuleResult]:
    """Open the tap and the management client, run the rules, close them. `options`: Kit's settings."""
    tap = await DeviceTap.open(broker, device_id)
    admin = BrokerAdmin.from_settings(broker)
    try:
        return await run(Kit(api, tap, admin, device_id, **options), rules)
    finally:
        await admin.aclose()
        await tap.close()


def report(device_id: str, results: list[RuleResult]) -> str:
    """The report printed by the CLI: one block per rule with what the kit saw."""
    lines = [f"conformance of device {device_id}"]
    for result in results:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[result.passed]
        lines.append(f"{verdict}  {result.rule}: {(RULES[result.rule].__doc__ or '').strip()}")
        lines += [f"        {line}" for line in result.saw]
    failed = sum(1 for result in results if result.passed is False)
    lines.append(f"{len(results) - failed} of {len(results)} rules passed or skipped; {failed} failed")
    return "\n".join(lines)
