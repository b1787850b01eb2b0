"""What the fault tests share: a fleet of SDK devices, a task load over HTTP, and the audit check.

The load creates every task with its own Idempotency-Key and retries it (same key) until it gets
a 2xx, so that a request lost in a crash is neither lost nor doubled. The check reads the
database: every accepted task is final, and its `task_events` rows never show it handed out
twice without a timeout (a requeue) in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson

from app.settings import Settings
from swarm_device.client import DeviceClient
from swarm_device.protocol import FINAL_STATUSES
from swarm_device.tasks import TaskContext
from tests.conftest import DeviceCredentials

# Per attempt: long enough that only a fault (not a slow test box) makes a task time out.
TASK_TIMEOUT_S = 8
MAX_ATTEMPTS = 5


async def enrol(api: httpx.AsyncClient, cert_dir: Path, device_id: str) -> DeviceCredentials:
    response = await api.post("/devices", json={"id": device_id})
    assert response.status_code in (200, 201), response.text
    response = await api.post(f"/devices/{device_id}/certificate", json={})
    assert response.status_code == 201, response.text
    issued = response.json()
    creds = DeviceCredentials(
        device_id, cert_dir / f"{device_id}.crt", cert_dir / f"{device_id}.key", cert_dir / "ca.crt"
    )
    creds.cert_file.write_text(issued["certificate_pem"])
    creds.key_file.write_text(issued["private_key_pem"])
    creds.key_file.chmod(0o600)
    creds.ca_file.write_text(issued["ca_certificate_pem"])
    return creds


class Fleet:
    """SDK devices whose `work` task sleeps `params.ms` and returns `{"n": params.n}`."""

    def __init__(self, settings: Settings, devices: list[DeviceCredentials]) -> None:
        self.ids = [d.device_id for d in devices]
        self.clients = [self._client(settings, d) for d in devices]
        # Set when a handler has finished and its result report is about to be sent.
        self.reporting = asyncio.Event()

    def _client(self, settings: Settings, creds: DeviceCredentials) -> DeviceClient:
        client = DeviceClient(
            creds.device_id,
            settings.broker.mqtt_host,
            settings.broker.mqtt_port,
            creds.ca_file,
            creds.cert_file,
            creds.key_file,
            protocol="3.1.1",
            request_timeout=3.0,
            request_max_timeout=5.0,
            reconnect_min=0.5,
            reconnect_max=2.0,
        )

        @client.task_handler("work")
        async def work(ctx: TaskContext) -> dict[str, Any]:
            await asyncio.sleep(ctx.params.get("ms", 0) / 1000)
            self.reporting.set()
            return {"n": ctx.params["n"]}

        return client

    def busy(self) -> int:
        return sum(client.running_task is not None for client in self.clients)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Fleet]:
        async with contextlib.AsyncExitStack() as stack:
            for client in self.clients:
                await stack.enter_async_context(client)
            async with asyncio.timeout(30):
                await asyncio.gather(*(client.ready.wait() for client in self.clients))
            yield self


@dataclass
class Load:
    """Creates `total` tasks over HTTP from `workers` concurrent senders, spread over the APIs."""

    apis: list[httpx.AsyncClient]
    device_ids: list[str]
    total: int
    workers: int = 4
    pause_s: float = 0.02
    work_ms: int = 50
    # task id -> (Idempotency-Key, n)
    accepted: dict[str, tuple[str, int]] = field(default_factory=dict)
    answers: Counter[str] = field(default_factory=Counter)
    last_accepted_at: float = 0.0
    _next: int = 0

    async def run(self) -> None:
        await asyncio.gather(*(self._sender(w) for w in range(self.workers)))

    async def _sender(self, worker: int) -> None:
        while self._next < self.total:
            n = self._next
            self._next += 1
            await self._create(n, self.apis[(n + worker) % len(self.apis)])
            await asyncio.sleep(self.pause_s)

    async def _create(self, n: int, api: httpx.AsyncClient) -> None:
        key = uuid.uuid4().hex
        body = {
            "method": "work",
            "params": {"n": n, "ms": self.work_ms},
            "timeout_s": TASK_TIMEOUT_S,
            "max_attempts": MAX_ATTEMPTS,
        }
        device_id = self.device_ids[n % len(self.device_ids)]
        while True:
            try:
                response = await api.post(
                    f"/devices/{device_id}/tasks", json=body, headers={"Idempotency-Key": key}, timeout=10
                )
            except httpx.TransportError as exc:
                self.answers[type(exc).__name__] += 1
            else:
                self.answers[str(response.status_code)] += 1
                if response.is_success:
                    self.accepted[response.json()["id"]] = (key, n)
                    self.last_accepted_at = time.monotonic()
                    return
                # Only an outage may refuse a valid request, and it must say so with a 503.
                assert response.status_code == 503, response.text
                assert response.headers["content-type"] == "application/problem+json"
            await asyncio.sleep(0.2)


@dataclass
class Outcome:
    statuses: Counter[str]
    handed_out: int
    requeued: int
    wrong_results: int

    def line(self) -> str:
        return (
            f"final statuses {dict(self.statuses)}; handed out {self.handed_out} times, "
            f"{self.requeued} requeued after a deadline; results not matching their task: {self.wrong_results}"
        )


async def wait_all_final(dsn: str, task_ids: list[str], within_s: float = 90) -> float:
    """Seconds until every task is final; fails with the stragglers if they do not get there."""
    ids = [uuid.UUID(t) for t in task_ids]
    started = time.monotonic()
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            rows = await conn.fetch(
                "SELECT id, status FROM tasks WHERE id = ANY($1) AND NOT status = ANY($2)",
                ids,
                [s.value for s in FINAL_STATUSES],
            )
            if not rows:
                return time.monotonic() - started
            if time.monotonic() - started > within_s:
                stragglers = Counter(r["status"] for r in rows)
                raise AssertionError(f"{len(rows)} accepted tasks never became final: {dict(stragglers)}")
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def audit(dsn: str, load: Load) -> Outcome:
    """Check every accepted task in the database and its audit rows; returns what was counted."""
    ids = [uuid.UUID(t) for t in load.accepted]
    conn = await asyncpg.connect(dsn)
    try:
        tasks = await conn.fetch("SELECT id, status, version, params, result FROM tasks WHERE id = ANY($1)", ids)
        events = await conn.fetch(
            "SELECT task_id, version, status FROM task_events WHERE task_id = ANY($1) ORDER BY task_id, version", ids
        )
        keys = [key for key, _ in load.accepted.values()]
        created = await conn.fetchval("SELECT count(*) FROM tasks WHERE idempotency_key = ANY($1)", keys)
    finally:
        await conn.close()
    # Nothing lost, nothing doubled: one task per accepted request, even for retried requests.
    assert len(tasks) == len(load.accepted) == created
    by_task: dict[uuid.UUID, list[asyncpg.Record]] = {}
    for event in events:
        by_task.setdefault(event["task_id"], []).append(event)
    handed_out = requeued = wrong = 0
    for task in tasks:
        history = by_task[task["id"]]
        assert [e["version"] for e in history] == list(range(1, task["version"] + 1)), task["id"]
        out = False
        for event in history:
            if event["status"] == "in_progress":
                assert not out, f"task {task['id']} handed out again without a timeout: {history}"
                out = True
                handed_out += 1
            elif event["status"] == "queued" and event["version"] > 1:
                assert out, f"task {task['id']} requeued without being handed out: {history}"
                out = False
                requeued += 1
        n = _loads(task["params"])["n"]
        if task["status"] == "succeeded" and _loads(task["result"]) != {"n": n}:
            wrong += 1
    statuses = Counter(t["status"] for t in tasks)
    return Outcome(statuses, handed_out, requeued, wrong)


def _loads(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


async def until(condition: Callable[[], bool], within_s: float = 30) -> None:
    """Wait until `condition()` holds, checking every few milliseconds."""
    async with asyncio.timeout(within_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)
