"""The one place that starts and stops resources, in order, and yields the typed Runtime."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import TypedDict

from fastapi import FastAPI

from app import pki
from app.asyncapi import document_down_topics
from app.auth import TokenVerifier
from app.broker import ConfirmedPublisher, create_broker, declare_dead_letter_path
from app.db import create_engine, create_sessionmaker
from app.dependencies import Runtime
from app.device_limits import ConnectLimiter, DeviceLimiter, FloodMeter
from app.device_rpc import DeviceRpcRouter
from app.devices import messaging as device_messaging
from app.devices import presence
from app.devices import service as devices
from app.devices.broker_admin import BrokerAdmin
from app.devices.config import RetainedPublisher
from app.events.feed import ChangeFeed
from app.scheduler import create_scheduler
from app.settings import Settings
from app.tasks import messaging as task_messaging
from app.tasks.intake import IntakeBatcher
from app.tasks.notifier import Notifier
from app.tasks.waiters import TaskWaiters

log = logging.getLogger(__name__)


class State(TypedDict):
    runtime: Runtime


@contextlib.asynccontextmanager
async def run_resources(settings: Settings) -> AsyncIterator[Runtime]:
    """Engine -> sessions -> replies' publisher -> broker (subscribers) -> flood meter -> notices' publisher,
    notifier, intake -> scheduler; stop in reverse (the change feed and the waiters run only while
    requests wait on them)."""
    engine = create_engine(settings.database)
    sessions = create_sessionmaker(engine)
    broker = create_broker(settings.broker)
    publisher = ConfirmedPublisher(settings.broker)
    replies = ConfirmedPublisher(settings.broker, name="swarm-core replies")
    broker_admin = BrokerAdmin.from_settings(settings.broker)
    on_limited = functools.partial(devices.record_limited, sessions, broker_admin, settings.device_limits)
    limiter = DeviceLimiter(settings.device_limits, on_limited)
    meter = FloodMeter(settings.broker, settings.device_limits, on_limited)
    rpc = DeviceRpcRouter(replies, max_concurrency=settings.database.pool_size, limiter=limiter)
    task_messaging.register(rpc, sessions)
    device_messaging.register(rpc, sessions)
    presence_consumer = presence.register(rpc.router, sessions, ConnectLimiter(settings.device_limits, on_limited))
    broker.include_router(rpc.router)
    document_down_topics(broker)
    notifier = Notifier(publisher, sessions, expiry_s=settings.tasks.notice_expiry_s)
    changes = ChangeFeed(sessions, settings.database.change_poll_interval_s)
    runtime = Runtime(
        settings=settings,
        engine=engine,
        sessions=sessions,
        broker=broker,
        notifier=notifier,
        intake=IntakeBatcher(sessions, notifier),
        waiters=TaskWaiters(sessions, changes),
        broker_admin=broker_admin,
        config_publisher=RetainedPublisher(settings.broker),
        changes=changes,
        ca=pki.load_ca_files(settings.pki.ca_cert_file, settings.pki.ca_key_file),
        tokens=TokenVerifier(settings.auth),
    )
    scheduler = create_scheduler(runtime)
    try:
        await replies.connect()
        await broker.connect()
        await declare_dead_letter_path(broker)
        await broker.start()
        meter.start()
        await publisher.connect()
        runtime.notifier.start()
        if settings.scheduler.enabled:
            scheduler.start()
        yield runtime
    finally:
        if scheduler.running:
            scheduler.shutdown(wait=False)
        await runtime.waiters.stop()
        await runtime.changes.stop()
        await meter.stop()
        await rpc.drain()
        await limiter.drain()
        await presence_consumer.drain()
        await runtime.intake.drain()
        await runtime.notifier.stop()
        await publisher.close()
        await broker.stop()
        await replies.close()
        await runtime.broker_admin.aclose()
        await engine.dispose()


def lifespan_for(settings: Settings) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[State]]:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[State]:
        async with run_resources(settings) as runtime:
            yield {"runtime": runtime}

    return lifespan
