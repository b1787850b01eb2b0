"""Connection events in hand are applied together, in one transaction, in their order.

The consumer is fed the broker's event messages directly (stand-ins with the headers the broker
sends, recording their ack) and writes to the real database; the path from the broker through
FastStream is covered by the presence tests with real devices (test_device_security,
test_events).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import asyncpg

from app.db import Sessions
from app.device_rpc import RabbitMessage
from app.devices.presence import PresenceConsumer
from tests.conftest import unique_device_id


@dataclass
class EventMessage:
    """What the consumer reads of a broker event message, and what it did with it."""

    routing_key: str
    headers: dict[str, Any]
    outcome: list[str] = field(default_factory=list)

    @property
    def raw_message(self) -> SimpleNamespace:
        return SimpleNamespace(routing_key=self.routing_key)

    async def ack(self) -> None:
        self.outcome.append("ack")

    async def reject(self, requeue: bool = False) -> None:
        self.outcome.append("reject")


def opened(name: str, user: str, protocol: str = "MQTT 3.1.1") -> EventMessage:
    return EventMessage("connection.created", {"name": name, "user": user, "protocol": protocol})


def closed(name: str) -> EventMessage:
    return EventMessage("connection.closed", {"name": name})


async def feed(sessions: Sessions, messages: list[EventMessage]) -> None:
    """Hand the messages over back to back, as FastStream does with those it has in hand."""
    consumer = PresenceConsumer(sessions)
    for message in messages:
        await consumer.consume(cast(RabbitMessage, message))
    await consumer.drain()


async def test_events_in_hand_are_applied_in_one_transaction_in_order(
    sessions: Sessions, db: asyncpg.Connection
) -> None:
    d1, d2 = unique_device_id("pres"), unique_device_id("pres")
    await db.execute("INSERT INTO devices (id) VALUES ($1), ($2)", d1, d2)
    c = [f"{d1}-conn-{n}" for n in range(5)]
    messages = [
        opened(c[0], d1),
        opened(c[1], d1),  # a second connection of d1 (a takeover in progress)
        opened(c[2], d2),
        closed(c[0]),  # d1 keeps c[1]: stays online
        opened(c[3], "swarm-core", protocol="AMQP 0-9-1"),  # the core's own connection: ignored
        opened(c[4], unique_device_id("unknown")),  # not one of ours: ignored
        closed(c[2]),  # d2's only connection: offline
        closed("never-seen"),
    ]
    await feed(sessions, messages)

    assert [m.outcome for m in messages] == [["ack"]] * len(messages)
    online = dict(await db.fetch("SELECT id, online FROM devices WHERE id = ANY($1)", [d1, d2]))
    assert online == {d1: True, d2: False}
    connections = await db.fetch("SELECT name, device_id FROM device_connections WHERE name = ANY($1)", c)
    assert [tuple(row) for row in connections] == [(c[1], d1)]
    events = await db.fetch(
        "SELECT device_id, event FROM device_events WHERE device_id = ANY($1) ORDER BY id", [d1, d2]
    )
    assert [tuple(row) for row in events] == [(d1, "online"), (d2, "online"), (d2, "offline")]
    # Written by one transaction: every row it wrote carries its id.
    writers = await db.fetch(
        "SELECT xmin FROM devices WHERE id = ANY($1) UNION SELECT xmin FROM device_connections WHERE name = $2",
        [d1, d2],
        c[1],
    )
    assert len(writers) == 1


async def test_an_event_that_fails_is_dropped_and_the_others_applied(
    sessions: Sessions, db: asyncpg.Connection
) -> None:
    d1 = unique_device_id("pres")
    await db.execute("INSERT INTO devices (id) VALUES ($1)", d1)
    too_long = "x" * 300  # device_connections.name holds 255 characters
    messages = [opened(f"{d1}-a", d1), opened(too_long, d1), closed(f"{d1}-a"), opened(f"{d1}-b", d1)]
    await feed(sessions, messages)

    assert [m.outcome for m in messages] == [["ack"], ["reject"], ["ack"], ["ack"]]
    assert await db.fetchval("SELECT online FROM devices WHERE id = $1", d1) is True
    names = await db.fetch("SELECT name FROM device_connections WHERE device_id = $1", d1)
    assert [row["name"] for row in names] == [f"{d1}-b"]
