"""Query plans of the hot and periodic queries, run through the app's own repository functions.

Each query runs once in a transaction that is rolled back, its SQL recorded as the driver got it;
then each recorded statement runs again under `EXPLAIN (ANALYZE, BUFFERS)`, also rolled back. The
figures say whether a query stays cheap as the tables grow: its execution time, the pages it
touched, and the scans it chose (a sequential scan of `tasks` at 1M rows is what to look for).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.devices import repository as devices
from app.events import repository as events
from app.tasks import repository as tasks
from app.tasks.schemas import TaskFilter
from swarm_device.protocol import TaskStatus

Query = Callable[[AsyncSession], Awaitable[object]]

# What `tasks/next` runs for a device with nothing to do: one statement.
PULL = ("current_or_claim (nothing pending)",)


def queries(pending: str, in_progress: str, quiet: str) -> dict[str, Query]:
    """The queries to explain, for devices with a queued task, with one in progress, with only
    final ones."""
    week_ago = datetime.now(UTC) - timedelta(days=7)

    def listing(**filters: Any) -> Query:
        return lambda s: tasks.list_tasks(s, TaskFilter(**filters), None, 50)

    async def events_from_newest(session: AsyncSession) -> object:
        return await events.events_after(session, await events.last_event_id(session) - 1000, 500)

    return {
        "in_progress_task (nothing)": lambda s: tasks.in_progress_task(s, quiet),
        "current_or_claim (nothing pending)": lambda s: tasks.current_or_claim(s, quiet),
        "current_or_claim (pending)": lambda s: tasks.current_or_claim(s, pending),
        "in_progress_task": lambda s: tasks.in_progress_task(s, in_progress),
        "lock_pending_of_device": lambda s: tasks.lock_pending_of_device(s, in_progress),
        "notices_due (periodic)": lambda s: tasks.notices_due(s, 30.0, 500),
        "lock_overdue (periodic)": lambda s: tasks.lock_overdue(s, 500),
        "lock_expired (periodic)": lambda s: tasks.lock_expired(s, 500),
        "lock_config_due (periodic)": lambda s: devices.lock_config_due(s, None),
        "list_tasks": listing(),
        "list_tasks device": listing(device_id=in_progress),
        "list_tasks status=queued": listing(status=[TaskStatus.QUEUED]),
        "list_tasks status=failed": listing(status=[TaskStatus.FAILED]),
        "list_tasks status=rejected (none)": listing(status=[TaskStatus.REJECTED]),
        "list_tasks status=failed,timed_out": listing(status=[TaskStatus.FAILED, TaskStatus.TIMED_OUT]),
        "list_tasks method": listing(method="reboot"),
        "list_tasks batch": listing(batch_id=uuid.uuid4()),
        "list_tasks device+status": listing(device_id=in_progress, status=[TaskStatus.SUCCEEDED]),
        "list_tasks created window": listing(created_after=week_ago, created_before=week_ago + timedelta(hours=1)),
        "events_after (near the head)": events_from_newest,
        "events_after (from 0)": lambda s: events.events_after(s, 0, 500),
    }


def _summary(plan: dict[str, Any]) -> dict[str, Any]:
    """Execution time, pages touched and the scans of one `EXPLAIN (FORMAT JSON)` plan."""
    scans: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        if "Scan" in node["Node Type"]:
            where = node.get("Index Name") or node.get("Relation Name") or ""
            scans.append(f"{node['Node Type']} {where}".strip())
        for child in node.get("Plans", []):
            walk(child)

    root = plan["Plan"]
    walk(root)
    return {
        "ms": round(plan["Execution Time"], 2),
        "pages": root.get("Shared Hit Blocks", 0) + root.get("Shared Read Blocks", 0),
        "scans": scans,
    }


async def explain(url: str, pending: str, in_progress: str, quiet: str) -> dict[str, dict[str, Any]]:
    """Plan summaries by query name (a query of several statements: times and pages added up)."""
    engine = create_async_engine(url, pool_size=1)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    recorded: list[tuple[str, Any]] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if not statement.startswith("EXPLAIN"):
            recorded.append((statement, parameters))

    results: dict[str, dict[str, Any]] = {}
    try:
        for name, query in queries(pending, in_progress, quiet).items():
            recorded.clear()
            async with sessions() as session:
                await query(session)
                await session.rollback()
                statements = list(recorded)
                total: dict[str, Any] = {"ms": 0.0, "pages": 0, "scans": []}
                for statement, parameters in statements:
                    conn = await session.connection()
                    answer = await conn.exec_driver_sql(
                        f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}", parameters
                    )
                    value = answer.scalar_one()
                    plan = _summary((orjson.loads(value) if isinstance(value, str) else value)[0])
                    total["ms"] = round(total["ms"] + plan["ms"], 2)
                    total["pages"] += plan["pages"]
                    total["scans"] += plan["scans"]
                await session.rollback()
            results[name] = total
    finally:
        await engine.dispose()
    return results
