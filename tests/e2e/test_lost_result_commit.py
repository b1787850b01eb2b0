"""A device handed a task it already reported (issue 12, finding 5), reproduced deterministically.

Cause: the test stack's PostgreSQL ran with `synchronous_commit = off`, which acknowledges a
commit before its WAL is written; a kill -9 of PostgreSQL then loses the last commits, among
them results the device had been told were accepted. The task is in progress again, and
`tasks/next` rightly hands it out as the device's current task. The stack no longer runs so
(scripts/stack.sh); a restore from a backup does the same, so the protocol says what a device
does (docs/DESIGN.md): report the same result again, never run the task twice. Here the lost
commit is made by hand (the row put back as it was before the result), with a real SDK device.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import asyncpg
import httpx

from app.settings import Settings
from tests.conftest import EnrolDevice
from tests.e2e.test_sdk_device import make_device, running, wait_final
from tests.polling import eventually


async def lose_the_result_commit(db: asyncpg.Connection, task_id: str) -> None:
    """The task as it was before its result was committed: in progress, one version back, and
    without the audit row of the result (a lost commit takes both)."""
    async with db.transaction():
        await db.execute("ALTER TABLE tasks DISABLE TRIGGER tasks_guard_final, DISABLE TRIGGER tasks_record_event")
        await db.execute(
            """UPDATE tasks SET status = 'in_progress', version = version - 1, result = NULL, error = NULL,
               finished_at = NULL, deadline_at = now() + interval '1 hour' WHERE id = $1""",
            uuid.UUID(task_id),
        )
        await db.execute(
            "DELETE FROM task_events WHERE task_id = $1 AND version = (SELECT version + 1 FROM tasks WHERE id = $1)",
            uuid.UUID(task_id),
        )
        await db.execute("ALTER TABLE tasks ENABLE TRIGGER tasks_guard_final, ENABLE TRIGGER tasks_record_event")


async def test_a_task_handed_out_again_after_its_result_is_reported_again_not_run_again(
    app_client: httpx.AsyncClient, enrol_device: EnrolDevice, settings: Settings, db: asyncpg.Connection
) -> None:
    creds = await enrol_device("lost")
    runs: Counter[int] = Counter()
    device = make_device(settings, creds)

    @device.task_handler("count")
    async def count(ctx: Any) -> dict[str, Any]:
        runs[ctx.params["n"]] += 1
        return {"n": ctx.params["n"]}

    async with running(device):
        first = (
            await app_client.post(f"/devices/{creds.device_id}/tasks", json={"method": "count", "params": {"n": 1}})
        ).json()
        done = await wait_final(app_client, first["id"])
        assert (done["status"], done["result"]) == ("succeeded", {"n": 1})

        await lose_the_result_commit(db, first["id"])
        assert (await app_client.get(f"/tasks/{first['id']}")).json()["status"] == "in_progress"
        # Any wake-up makes the device pull: a new task's notice.
        second = (
            await app_client.post(f"/devices/{creds.device_id}/tasks", json={"method": "count", "params": {"n": 2}})
        ).json()
        assert (await wait_final(app_client, second["id"]))["status"] == "succeeded"
        await eventually(lambda: device.stats.reports_resent == 1, within_s=20)
        again = await wait_final(app_client, first["id"])

    # The first task was handed out again and answered with the same report, not run again.
    assert (again["status"], again["result"], again["attempt"]) == ("succeeded", {"n": 1}, 1)
    assert runs == {1: 1, 2: 1}
