"""What the lifespan builds and the request handlers receive: one typed Runtime."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, cast

from fastapi import Depends, Request
from faststream.rabbit import RabbitBroker
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.devices.broker_admin import BrokerAdmin
from app.devices.config import RetainedPublisher
from app.events.feed import EventFeed
from app.pki import CertificateAuthority
from app.settings import Settings
from app.tasks.notifier import Notifier
from app.tasks.waiters import TaskWaiters


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    broker: RabbitBroker
    notifier: Notifier
    waiters: TaskWaiters
    broker_admin: BrokerAdmin
    config_publisher: RetainedPublisher
    events: EventFeed
    ca: CertificateAuthority


def get_runtime(request: Request) -> Runtime:
    return cast(Runtime, request.state.runtime)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
