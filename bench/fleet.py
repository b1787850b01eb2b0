"""Benchmark devices in bulk: rows, certificates and broker users for thousands at once.

Enrolment through the API is one request per device and three management API calls per broker
user; for 10,000 devices the harness instead signs with `app.pki` directly (~0.3 ms a device),
inserts the rows in one statement and imports every broker user with one definitions upload,
using the same permissions `BrokerAdmin.provision_device` sets.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg
import httpx
from faststream.rabbit import RabbitQueue

from app import pki
from app.broker import create_broker
from app.devices.broker_admin import device_permissions, device_topic_permissions, device_user_limits
from app.settings import Settings

PURGE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Fleet:
    """Enrolled benchmark devices: `<prefix>1` .. `<prefix><count>`, credentials in `cert_dir`."""

    prefix: str
    count: int
    cert_dir: Path

    def ids(self, count: int | None = None) -> list[str]:
        return [f"{self.prefix}{n}" for n in range(1, (count or self.count) + 1)]


async def insert_devices(dsn: str, prefix: str, count: int) -> None:
    """Device rows `<prefix>1..<prefix><count>` (existing ones are kept)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO devices (id) SELECT $1 || n FROM generate_series(1, $2::int) AS n ON CONFLICT DO NOTHING",
            prefix,
            count,
        )
    finally:
        await conn.close()


def write_credentials(settings: Settings, device_ids: list[str], cert_dir: Path) -> None:
    """A fresh key and certificate per device, signed by the stack's CA."""
    shutil.rmtree(cert_dir, ignore_errors=True)
    cert_dir.mkdir(parents=True)
    ca = pki.load_ca_files(settings.pki.ca_cert_file, settings.pki.ca_key_file)
    for device_id in device_ids:
        key_pem, certificate = pki.issue_device_credentials(ca, device_id, settings.pki.device_cert_days)
        (cert_dir / f"{device_id}.crt").write_bytes(pki.certificate_pem(certificate))
        key_file = cert_dir / f"{device_id}.key"
        key_file.touch(mode=0o600)
        key_file.write_bytes(key_pem)


async def provision_broker_users(settings: Settings, device_ids: list[str]) -> None:
    """Import the devices' broker users with one definitions upload (idempotent, like the PUTs; the
    limits too, so that a device blocked in an earlier run may connect again)."""
    broker = settings.broker
    vhost = broker.devices_vhost
    definitions = {
        "users": [
            {
                "name": d,
                "password_hash": "",
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": "",
                "limits": device_user_limits(broker.device_max_connections),
            }
            for d in device_ids
        ],
        "permissions": [{"user": d, "vhost": vhost, **device_permissions(d)} for d in device_ids],
        "topic_permissions": [{"user": d, "vhost": vhost, **device_topic_permissions()} for d in device_ids],
    }
    auth = (broker.management_user, broker.management_password.get_secret_value())
    async with httpx.AsyncClient(base_url=broker.management_url, auth=auth, timeout=300) as client:
        response = await client.post("/api/definitions", json=definitions)
        response.raise_for_status()


async def purge_queues(settings: Settings) -> int:
    """Empty every queue of the devices vhost: what an earlier run left there (hellos, presence
    events, replies) refers to a database that was just re-created, and would be worked off
    during this run's measurements. Returns the messages dropped. The management user may list
    the queues but not read them; the core's own AMQP connection purges them."""
    broker = settings.broker
    vhost = quote(broker.devices_vhost, safe="")
    auth = (broker.management_user, broker.management_password.get_secret_value())
    async with httpx.AsyncClient(base_url=broker.management_url, auth=auth, timeout=60) as client:
        response = await client.get(f"/api/queues/{vhost}", params={"columns": "name,messages,exclusive"})
        response.raise_for_status()
        # An exclusive queue belongs to a live connection (a connected device's session, a consumer
        # of the raw round trip) and goes with it; nobody else may touch it.
        # The app's own queues always: the statistics may be a minute old, or not there yet
        # after the node restarted (10,000 presence events were missed so).
        stale = [
            q["name"]
            for q in response.json()
            if not q.get("exclusive") and (q.get("messages") or q["name"].startswith("swarm."))
        ]
    if not stale:
        return 0
    core = create_broker(broker)
    purged = 0
    try:
        # Bounded: a connection the broker refuses (a limit on the core's user) is retried forever.
        async with asyncio.timeout(PURGE_TIMEOUT_S):
            await core.connect()
            for name in stale:
                queue = await core.declare_queue(RabbitQueue(name, declare=False))
                purged += (await queue.purge()).message_count or 0
    finally:
        await core.stop()
    return purged


async def enrol(settings: Settings, dsn: str, prefix: str, count: int, cert_dir: Path) -> Fleet:
    """Rows, credentials and broker users for `count` devices."""
    fleet = Fleet(prefix, count, cert_dir)
    ids = fleet.ids()
    await insert_devices(dsn, prefix, count)
    await asyncio.to_thread(write_credentials, settings, ids, cert_dir)
    await provision_broker_users(settings, ids)
    return fleet
