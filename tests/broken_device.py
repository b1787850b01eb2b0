"""Deliberately broken devices for the conformance kit's tests: the SDK's simulated device with one flaw.

Each flaw is what a naive firmware gets wrong, and breaks one rule of the kit (FLAWS says which).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any, Literal

import aiomqtt
import orjson

from app.settings import Settings
from swarm_device import DeviceClient, TaskContext
from swarm_device.protocol import Notice, Task, result_method
from swarm_device.simulator import build_handlers
from swarm_device.tasks import run_handler
from tests.conftest import DeviceCredentials

Flaw = Literal[
    "no-pull-on-connect",
    "no-pull-on-notice",
    "rerun-on-notice",
    "reconnect-on-malformed",
    "no-progress",
    "rerun-on-reconnect",
    "ignore-cancel",
]
FLAWS: dict[Flaw, str] = {
    "no-pull-on-connect": "pull-on-connect",
    "no-pull-on-notice": "notice-then-pull",
    "rerun-on-notice": "duplicate-notice",
    "reconnect-on-malformed": "malformed-messages",
    "no-progress": "progress-within-step-timeout",
    "rerun-on-reconnect": "resume-after-reconnect",
    "ignore-cancel": "cancel",
}


class BrokenDevice(DeviceClient):
    def __init__(self, settings: Settings, creds: DeviceCredentials, flaw: Flaw) -> None:
        super().__init__(
            creds.device_id,
            settings.broker.mqtt_host,
            settings.broker.mqtt_port,
            creds.ca_file,
            creds.cert_file,
            creds.key_file,
            protocol="3.1.1",
            request_timeout=5.0,
        )
        self.flaw = flaw
        self._extra: set[asyncio.Task[Any]] = set()
        handlers = build_handlers(0.0, 0.0, random.Random())  # noqa: S311 (no failures drawn: fail rate 0)
        if flaw == "no-progress":

            async def sleep(context: TaskContext) -> dict[str, Any]:
                await asyncio.sleep(float(context.params.get("seconds", 0)))
                return {"slept": context.params.get("seconds")}

            handlers["sleep"] = sleep
        for method, handler in handlers.items():
            self.add_task_handler(method, handler)

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._extra.add(task)
        task.add_done_callback(self._extra.discard)

    async def _run_again(self, task: Task) -> None:
        """Run the task once more and report it under a new request id (what must never happen)."""
        outcome = await run_handler(self._tasks.handlers.get(task.method), TaskContext(task, self.call))
        await self.call(result_method(task.id), outcome.model_dump(mode="json"))

    def _on_notice(self, notice: Notice) -> None:
        if notice.event == "task_canceled" and self.flaw == "ignore-cancel":
            return
        if notice.event == "task_queued" and self.flaw == "no-pull-on-notice":
            return
        if notice.event == "task_queued" and self.flaw == "rerun-on-notice":
            # Trusts the notice: reports the task again (a second run) instead of pulling first.
            done = [outcome for (task_id, _), outcome in self._tasks._outcomes.items() if task_id == notice.task_id]
            if done:
                self._spawn(self.call(result_method(notice.task_id), done[0].model_dump(mode="json")))
        super()._on_notice(notice)

    def _dispatch(self, message: aiomqtt.Message) -> None:
        if self.flaw == "reconnect-on-malformed":
            try:
                orjson.loads(message.payload)
            except orjson.JSONDecodeError as exc:
                raise aiomqtt.MqttError("cannot parse a message: starting over") from exc
        super()._dispatch(message)

    async def _greet(self) -> None:
        running = self._tasks.running
        if self.flaw == "rerun-on-reconnect" and running is not None:
            self._spawn(self._run_again(running))
        if self.flaw == "no-pull-on-connect":
            await self.call("hello", {}, until_answered=True)
            self.ready.set()
            return
        await super()._greet()

    async def stop(self) -> None:
        for task in list(self._extra):
            task.cancel()
        await super().stop()
