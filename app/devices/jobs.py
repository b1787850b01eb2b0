"""Bodies of the periodic device jobs."""

from __future__ import annotations

from app.dependencies import Runtime
from app.devices import config, service


async def reconcile_presence(runtime: Runtime) -> None:
    await service.reconcile_presence(runtime.sessions, runtime.broker_admin)


async def publish_configs(runtime: Runtime) -> None:
    await config.publish_due(runtime.sessions, runtime.config_publisher)
