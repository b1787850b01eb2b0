"""A DeviceRpcRouter of the tests' own, on the real broker, wired as the lifespan wires the app's.

Register handlers with `method` (as on the router), then `async with` it: the broker consumes
until the block ends; the methods' queues are deleted afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from app.broker import ConfirmedPublisher, create_broker
from app.device_rpc import DeviceRpcRouter, Handler, P, queue_for
from app.settings import Settings
from tests.management import core_broker


class StandaloneRpc:
    def __init__(self, settings: Settings, name: str) -> None:
        self._settings = settings
        self.broker = create_broker(settings.broker)
        self._replies = ConfirmedPublisher(settings.broker, name=f"{name} test replies")
        self._rpc = DeviceRpcRouter(self._replies)
        self._patterns: list[str] = []

    def method(self, pattern: str, params: type[P]) -> Callable[[Handler[P]], Handler[P]]:
        self._patterns.append(pattern)
        return self._rpc.method(pattern, params)

    async def __aenter__(self) -> StandaloneRpc:
        self.broker.include_router(self._rpc.router)
        await self.broker.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.broker.stop()
        await self._replies.close()
        async with core_broker(self._settings.broker) as cleanup:
            for pattern in self._patterns:
                await (await cleanup.declare_queue(queue_for(pattern))).delete(if_unused=False, if_empty=False)
