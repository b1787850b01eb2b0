"""Bodies of the periodic device jobs."""

from __future__ import annotations

import logging

from app.dependencies import Runtime
from app.devices import config, service
from app.errors import BrokerAdminError

log = logging.getLogger(__name__)


async def reconcile_broker(runtime: Runtime) -> None:
    """Broker users and presence made to match the database and the broker's open connections:
    repairs a broker that lost users or kept revoked ones, and presence events missed while no
    app was consuming them. Runs at start-up (in the background) and then now and then."""
    try:
        provisioned, removed = await service.reconcile_broker_users(
            runtime.sessions, runtime.broker_admin, runtime.failed_rows
        )
        online = await service.reconcile_presence(runtime.sessions, runtime.broker_admin)
    except BrokerAdminError as exc:
        log.warning("broker reconciliation skipped: %s", exc)
        return
    log.info("broker reconciled: %d users provisioned, %d removed; %d devices online", provisioned, removed, online)


async def publish_configs(runtime: Runtime) -> None:
    await config.publish_due(runtime.sessions, runtime.config_publisher, runtime.failed_rows)


async def lift_blocks(runtime: Runtime) -> None:
    """Devices blocked for going over their limits may connect again once their block ran out."""
    try:
        lifted = await service.lift_blocks(runtime.sessions, runtime.broker_admin)
    except BrokerAdminError as exc:
        log.warning("lifting device blocks skipped: %s", exc)
        return
    if lifted:
        log.info("%d device blocks lifted", lifted)
