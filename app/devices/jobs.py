"""Bodies of the periodic device jobs."""

from __future__ import annotations

from app.dependencies import Runtime
from app.devices import service


async def reconcile_presence(runtime: Runtime) -> None:
    await service.reconcile_presence(runtime.sessions, runtime.broker_admin)
