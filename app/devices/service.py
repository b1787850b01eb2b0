"""Device enrolment, broker provisioning, revocation, hello and reported state."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from app import pki
from app.db import Sessions
from app.device_limits import LimitEvent
from app.devices import repository as repo
from app.devices.broker_admin import BrokerAdmin
from app.devices.models import Device, DeviceCertificate
from app.devices.schemas import CertificateIssued, DeviceRead
from app.errors import Conflict, FailedRows, NotFound
from app.settings import DeviceLimitSettings, Settings
from app.tasks import service as tasks
from app.tasks.notifier import Notifier
from swarm_device.protocol import Device as DeviceWire
from swarm_device.protocol import HelloParams, StateParams

log = logging.getLogger(__name__)

# The reconciliation's name in FailedRows.
BROKER_USERS = "broker-users"


def to_read(device: Device) -> DeviceRead:
    return DeviceRead.model_validate(device)


async def active_device(session: AsyncSession, device_id: str, *, lock: bool = False) -> Device:
    """The device, if it exists and is not revoked (else NotFound); row-locked with `lock`."""
    device = await repo.get_device(session, device_id, lock=lock)
    if device is None or device.revoked_at is not None:
        raise NotFound(f"device {device_id!r} does not exist")
    return device


async def enrol_device(sessions: Sessions, admin: BrokerAdmin, device_id: str) -> tuple[DeviceRead, bool]:
    """Create the device (idempotent) and its broker user. Returns the device and whether it is new."""
    async with sessions() as session:
        existing = await repo.get_device(session, device_id)
        if existing is not None and existing.revoked_at is not None:
            raise Conflict(f"device {device_id!r} was revoked; device ids are not reused")
        device = existing or await repo.insert_device_if_absent(session, device_id)
        await session.commit()
    # After the commit: if the broker call fails, the same POST again (or start-up reconciliation) repairs it.
    await admin.provision_device(device_id)
    return to_read(device), existing is None


async def record_limited(
    sessions: Sessions, admin: BrokerAdmin, settings: DeviceLimitSettings, device_id: str, event: LimitEvent
) -> None:
    """A device went over its limits: shown on its record and in the event stream; a `BLOCKED`
    one is also shut out at the broker (its connections closed, new ones refused) for `block_s`.

    Committed first: if the broker call fails, `lift_blocks` still clears what was recorded.
    """
    blocked_until = datetime.now(UTC) + timedelta(seconds=settings.block_s) if event is LimitEvent.BLOCKED else None
    async with sessions() as session:
        await repo.record_limited(session, device_id, event.value, blocked_until)
        await session.commit()
    if blocked_until is not None:
        await admin.block_device(device_id)
        log.warning("device %s blocked at the broker until %s", device_id, blocked_until.isoformat())


async def lift_blocks(sessions: Sessions, admin: BrokerAdmin) -> int:
    """Let the devices whose block has run out connect again; returns how many."""
    async with sessions() as session:
        device_ids = await repo.lock_blocks_over(session)
        for device_id in device_ids:
            await admin.unblock_device(device_id)
        await repo.clear_blocks(session, device_ids)
        await session.commit()
    return len(device_ids)


async def get_device(sessions: Sessions, device_id: str) -> DeviceRead:
    async with sessions() as session:
        device = await repo.get_device(session, device_id)
    if device is None:
        raise NotFound(f"device {device_id!r} does not exist")
    return to_read(device)


async def list_devices(
    sessions: Sessions, *, online: bool | None, cursor: str | None, limit: int
) -> tuple[list[DeviceRead], str | None]:
    async with sessions() as session:
        rows = await repo.list_devices(session, online=online, after=cursor, limit=limit)
    items = [to_read(d) for d in rows]
    return items, (items[-1].id if len(items) == limit else None)


async def issue_certificate(
    sessions: Sessions, ca: pki.CertificateAuthority, settings: Settings, device_id: str, csr_pem: str | None
) -> CertificateIssued:
    """Sign the device's CSR (CN forced to the device id), or make a key pair for it."""
    days = settings.pki.device_cert_days
    key_pem: bytes | None = None
    if csr_pem is None:
        key_pem, certificate = pki.issue_device_credentials(ca, device_id, days)
    else:
        certificate = pki.sign_device_csr(ca, csr_pem.encode(), device_id, days)
    async with sessions() as session:
        await active_device(session, device_id, lock=True)
        await repo.add_certificate(
            session,
            DeviceCertificate(
                serial=pki.serial_hex(certificate),
                device_id=device_id,
                fingerprint_sha256=pki.fingerprint_sha256(certificate),
                not_after=certificate.not_valid_after_utc,
            ),
        )
        await session.commit()
    return CertificateIssued(
        device_id=device_id,
        serial=pki.serial_hex(certificate),
        fingerprint_sha256=pki.fingerprint_sha256(certificate),
        not_after=certificate.not_valid_after_utc,
        certificate_pem=pki.certificate_pem(certificate).decode(),
        ca_certificate_pem=pki.certificate_pem(ca.certificate).decode(),
        private_key_pem=key_pem.decode() if key_pem else None,
        mqtt_host=settings.broker.mqtt_host,
        mqtt_port=settings.broker.mqtt_port,
    )


async def revoke_device(sessions: Sessions, admin: BrokerAdmin, notifier: Notifier, device_id: str) -> DeviceRead:
    """Revoke: record it (certificates too), cancel open tasks, then remove the broker user and
    close the device's connections."""
    async with sessions() as session:
        device = await active_device(session, device_id, lock=True)
        device.revoked_at = device.updated_at = datetime.now(UTC)
        device.online = False
        await repo.revoke_certificates(session, device_id)
        canceled = await tasks.cancel_open_tasks_in(session, device_id)
        await session.commit()
    await admin.deprovision_device(device_id)
    closed = await admin.close_device_connections(device_id)
    for task_id in canceled:
        notifier.task_canceled(task_id, device_id)
    log.info("revoked device %s: %d tasks canceled, %d connections closed", device_id, len(canceled), closed)
    return to_read(device)


async def hello(sessions: Sessions, device_id: str, params: HelloParams) -> DeviceWire:
    async with sessions() as session:
        try:
            device = await repo.record_hello(session, device_id, params.firmware, params.model, params.capabilities)
        except LookupError:
            raise NotFound(f"device {device_id!r} is not enrolled") from None
        await session.commit()
    return DeviceWire.model_validate(device, from_attributes=True)


async def report_state(sessions: Sessions, device_id: str, params: StateParams) -> None:
    async with sessions() as session:
        await active_device(session, device_id)
        await repo.record_state(session, device_id, params.reported)
        await session.commit()


async def reconcile_broker_users(
    sessions: Sessions, admin: BrokerAdmin, failed: FailedRows | None = None
) -> tuple[int, int]:
    """Make broker users match the database: provision missing ones, remove strays (revoked,
    unknown). A device whose call fails (the management API answered, so not an outage) is left
    out (`failed`) and the others go on. Returns (provisioned, removed)."""
    failed = failed if failed is not None else FailedRows()
    async with sessions() as session:
        wanted = await repo.active_device_ids(session) - set(failed.of(BROKER_USERS))
    # Unreachable management API: BrokerAdminError here, before any device is tried.
    present = await admin.device_users() - set(failed.of(BROKER_USERS))
    # A few calls in flight: thousands of strays (say, after restoring an old backup) take
    # seconds, not minutes, without flooding the management API.
    limit = asyncio.Semaphore(8)

    async def bounded(device_id: str, call: Awaitable[None]) -> bool:
        async with limit:
            try:
                await call
            except Exception as exc:
                failed.add(BROKER_USERS, device_id, exc)
                return False
            return True

    provisioned = await asyncio.gather(*(bounded(d, admin.provision_device(d)) for d in wanted - present))
    removed = await asyncio.gather(*(bounded(u, admin.deprovision_device(u)) for u in present - wanted))
    return sum(provisioned), sum(removed)


async def apply_connection_events(sessions: Sessions, events: Sequence[repo.ConnectionEvent]) -> None:
    """The broker's connection events, in their order, in one transaction."""
    async with sessions() as session:
        await repo.apply_connection_events(session, events)
        await session.commit()


async def reconcile_presence(sessions: Sessions, admin: BrokerAdmin) -> int:
    """Presence from the broker's list of open connections (start-up, and now and then): events
    missed while no app was consuming them are repaired here. Returns the devices online."""
    connections = [
        (c.name, c.user, c.connected_at or datetime.now(UTC))
        for c in await admin.connections()
        if "MQTT" in c.protocol and c.user
    ]
    async with sessions() as session:
        await repo.replace_connections(session, connections)
        await session.commit()
    return len({user for _, user, _ in connections})
