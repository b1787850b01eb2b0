"""The device methods about the device itself: hello and reported state."""

from __future__ import annotations

from app.db import Sessions
from app.device_rpc import DeviceRequest, DeviceRpcRouter
from app.devices import service
from swarm_device.protocol import Acknowledged, Device, HelloParams, StateParams


def register(rpc: DeviceRpcRouter, sessions: Sessions) -> None:
    @rpc.method("hello", HelloParams)
    async def hello(request: DeviceRequest[HelloParams]) -> Device:
        """Registration on every (re)connect: firmware, model, capabilities. Idempotent. The answer
        is the device record with its desired configuration (`desired_config`)."""
        return await service.hello(sessions, request.device_id, request.params)

    @rpc.method("state", StateParams)
    async def state(request: DeviceRequest[StateParams]) -> Acknowledged:
        """The device's reported configuration/state; stored and acknowledged."""
        await service.report_state(sessions, request.device_id, request.params)
        return Acknowledged()
