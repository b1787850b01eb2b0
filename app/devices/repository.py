"""SQL for devices: plain async functions, SQL in, ORM objects out. Never commits."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, literal, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.devices.models import Device, DeviceCertificate, DeviceConnection
from app.events.models import DeviceEvent


async def get_device(session: AsyncSession, device_id: str, *, lock: bool = False) -> Device | None:
    stmt = select(Device).where(Device.id == device_id)
    if lock:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def insert_device_if_absent(session: AsyncSession, device_id: str) -> Device:
    await session.execute(insert(Device).values(id=device_id).on_conflict_do_nothing(index_elements=[Device.id]))
    device = await get_device(session, device_id)
    assert device is not None
    return device


async def list_devices(
    session: AsyncSession, *, online: bool | None, after: str | None, limit: int, include_revoked: bool = False
) -> Sequence[Device]:
    stmt = select(Device).order_by(Device.id).limit(limit)
    if online is not None:
        stmt = stmt.where(Device.online.is_(online))
    if not include_revoked:
        stmt = stmt.where(Device.revoked_at.is_(None))
    if after is not None:
        stmt = stmt.where(Device.id > after)
    return (await session.execute(stmt)).scalars().all()


async def active_device_ids(session: AsyncSession) -> set[str]:
    return set((await session.execute(select(Device.id).where(Device.revoked_at.is_(None)))).scalars())


async def record_hello(
    session: AsyncSession, device_id: str, firmware: str, model: str, capabilities: list[str]
) -> Device:
    stmt = (
        update(Device)
        .where(Device.id == device_id)
        .values(
            firmware=firmware,
            model=model,
            capabilities=capabilities,
            hello_at=func.now(),
            last_seen_at=func.now(),
            online=True,
            updated_at=func.now(),
        )
        .returning(Device)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    device = (await session.execute(stmt)).scalar_one_or_none()
    if device is None:
        raise LookupError(device_id)
    return device


async def record_state(session: AsyncSession, device_id: str, reported: dict[str, Any]) -> None:
    await session.execute(
        update(Device)
        .where(Device.id == device_id)
        .values(reported_state=reported, reported_at=func.now(), last_seen_at=func.now(), updated_at=func.now())
    )


async def record_limited(session: AsyncSession, device_id: str, event: str, blocked_until: datetime | None) -> None:
    """Stamp the device as limited now (blocked until then, if given) and log the device event."""
    values: dict[str, Any] = {"last_limited_at": func.now()}
    if blocked_until is not None:
        values["blocked_until"] = blocked_until
    await session.execute(update(Device).where(Device.id == device_id).values(**values))
    # Only for a device this database knows (a stray request of another stack's device is not).
    known = select(Device.id, literal(event)).where(Device.id == device_id)
    await session.execute(insert(DeviceEvent).from_select(["device_id", "event"], known))


async def lock_blocks_over(session: AsyncSession, limit: int = 100) -> list[str]:
    """Devices whose broker block has run out, row-locked (other replicas skip them)."""
    stmt = (
        select(Device.id)
        .where(Device.blocked_until <= func.now())
        .order_by(Device.blocked_until)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list((await session.execute(stmt)).scalars())


async def clear_blocks(session: AsyncSession, device_ids: Sequence[str]) -> None:
    await session.execute(update(Device).where(Device.id.in_(device_ids)).values(blocked_until=None))


async def set_presence(session: AsyncSession, device_ids: Sequence[str], online: bool, at: datetime) -> None:
    if device_ids:
        await session.execute(
            update(Device)
            .where(Device.id.in_(device_ids))
            .values(online=online, last_seen_at=at, updated_at=func.now())
            .execution_options(synchronize_session=False)
        )


async def add_certificate(session: AsyncSession, certificate: DeviceCertificate) -> None:
    session.add(certificate)
    await session.flush()


async def revoke_certificates(session: AsyncSession, device_id: str) -> None:
    await session.execute(
        update(DeviceCertificate)
        .where(DeviceCertificate.device_id == device_id, DeviceCertificate.revoked_at.is_(None))
        .values(revoked_at=func.now())
    )


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """A broker connection of a device opened (`device_id` set) or closed (None: the event names
    only the connection)."""

    name: str
    device_id: str | None
    at: datetime


# One statement per event, so that a run of them goes to PostgreSQL as one pipelined executemany.
# Opened: the device (if it is one of ours) goes online and the connection is recorded.
_CONNECTION_OPENED = text(
    """
    WITH device AS (
        UPDATE devices SET online = true, last_seen_at = :at, updated_at = now()
        WHERE id = :device_id
        RETURNING id
    )
    INSERT INTO device_connections (name, device_id, connected_at)
    SELECT CAST(:name AS text), id, CAST(:at AS timestamptz) FROM device
    ON CONFLICT (name) DO NOTHING
    """
)
# Closed: the connection is forgotten; the device goes offline when it was its last one. The
# statements of a WITH share one snapshot, so the NOT EXISTS still sees the row being deleted.
_CONNECTION_CLOSED = text(
    """
    WITH gone AS (DELETE FROM device_connections WHERE name = :name RETURNING device_id)
    UPDATE devices SET online = false, last_seen_at = :at, updated_at = now()
    FROM gone
    WHERE devices.id = gone.device_id
      AND NOT EXISTS (SELECT FROM device_connections c WHERE c.device_id = gone.device_id AND c.name <> :name)
    """
)


async def apply_connection_events(session: AsyncSession, events: Sequence[ConnectionEvent]) -> None:
    """Apply the events in their order; each run of opened (or of closed) ones is one executemany."""
    for opened, run in itertools.groupby(events, key=lambda event: event.device_id is not None):
        if opened:
            rows = [{"name": e.name, "device_id": e.device_id, "at": e.at} for e in run]
            await session.execute(_CONNECTION_OPENED, rows)
        else:
            await session.execute(_CONNECTION_CLOSED, [{"name": e.name, "at": e.at} for e in run])


async def replace_connections(session: AsyncSession, connections: Sequence[tuple[str, str, datetime]]) -> None:
    """Make the presence tables match the broker's list of open (name, device_id, connected_at)."""
    known = await active_device_ids(session)
    rows = [{"name": n, "device_id": d, "connected_at": at} for n, d, at in connections if d in known]
    await session.execute(delete(DeviceConnection))
    if rows:
        await session.execute(insert(DeviceConnection).values(rows).on_conflict_do_nothing())
    online = {row["device_id"] for row in rows}
    await session.execute(
        update(Device)
        .where(Device.online.is_(True), Device.id.not_in(online))
        .values(online=False, updated_at=func.now())
    )
    await session.execute(update(Device).where(Device.id.in_(online)).values(online=True, updated_at=func.now()))


async def set_desired_config(session: AsyncSession, device_id: str, desired: dict[str, Any]) -> None:
    await session.execute(
        update(Device)
        .where(Device.id == device_id)
        .values(desired_config=desired, desired_at=func.now(), config_due_at=func.now(), updated_at=func.now())
    )


async def lock_config_due(
    session: AsyncSession,
    device_ids: Sequence[str] | None,
    limit: int = 500,
    skip: Sequence[tuple[str, datetime | None]] = (),
) -> Sequence[Device]:
    """Active devices whose desired configuration still has to be published, locked (SKIP LOCKED
    for the periodic job, waiting for the named ones); not those whose (id, desired_at) is in `skip`."""
    stmt = (
        select(Device)
        .where(
            Device.config_due_at.is_not(None),
            Device.revoked_at.is_(None),
            tuple_(Device.id, Device.desired_at).not_in(skip),
        )
        .order_by(Device.config_due_at)
        .limit(limit)
    )
    if device_ids is None:
        stmt = stmt.with_for_update(skip_locked=True)
    else:
        stmt = stmt.where(Device.id.in_(device_ids)).with_for_update()
    return (await session.execute(stmt.execution_options(populate_existing=True))).scalars().all()


async def clear_config_due(session: AsyncSession, device_ids: Sequence[str]) -> None:
    await session.execute(
        update(Device)
        .where(Device.id.in_(device_ids))
        .values(config_due_at=None)
        .execution_options(synchronize_session=False)
    )
