"""Swarm Core device SDK: the device side of the protocol. Never imports `app`."""

from swarm_device.client import DeviceClient
from swarm_device.rpc import RpcCallError, RpcTimeoutError
from swarm_device.stats import DeviceStats
from swarm_device.tasks import TaskContext, TaskHandler, TaskRejected

__all__ = [
    "DeviceClient",
    "DeviceStats",
    "RpcCallError",
    "RpcTimeoutError",
    "TaskContext",
    "TaskHandler",
    "TaskRejected",
]
