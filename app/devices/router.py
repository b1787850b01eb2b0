from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from app.auth import Scope
from app.dependencies import RuntimeDep, requires
from app.devices import config, service
from app.devices.schemas import (
    CertificateIssued,
    CertificateRequest,
    DeviceConfigRead,
    DeviceCreate,
    DevicePage,
    DeviceRead,
)
from app.errors import API_ERRORS, problem_responses
from app.storable_json import StorableObject
from swarm_device.protocol import DEVICE_ID_PATTERN

router = APIRouter(
    prefix="/devices", tags=["devices"], dependencies=[requires(Scope.DEVICES_ADMIN)], responses=API_ERRORS
)
NOT_FOUND = problem_responses(404)

DeviceIdPath = Annotated[str, Path(pattern=DEVICE_ID_PATTERN, description="The device id (certificate CN).")]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": DeviceRead, "description": "Already enrolled"}, **problem_responses(409)},
)
async def create_device(body: DeviceCreate, runtime: RuntimeDep, response: Response) -> DeviceRead:
    """Enrol a device: its record and its broker user (certificate login only). Idempotent."""
    device, created = await service.enrol_device(runtime.sessions, runtime.broker_admin, body.id)
    if not created:
        response.status_code = status.HTTP_200_OK
    return device


@router.get("")
async def list_devices(
    runtime: RuntimeDep,
    online: bool | None = None,
    cursor: Annotated[str | None, Query(pattern=DEVICE_ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DevicePage:
    items, next_cursor = await service.list_devices(runtime.sessions, online=online, cursor=cursor, limit=limit)
    return DevicePage(items=items, next_cursor=next_cursor)


@router.get("/{device_id}", responses=NOT_FOUND)
async def get_device(device_id: DeviceIdPath, runtime: RuntimeDep) -> DeviceRead:
    return await service.get_device(runtime.sessions, device_id)


@router.delete("/{device_id}", responses=NOT_FOUND)
async def revoke_device(device_id: DeviceIdPath, runtime: RuntimeDep) -> DeviceRead:
    """Revoke: broker user removed, connections closed, open tasks canceled, certificates revoked."""
    return await service.revoke_device(runtime.sessions, runtime.broker_admin, runtime.notifier, device_id)


@router.put("/{device_id}/config", responses=NOT_FOUND)
async def put_config(device_id: DeviceIdPath, desired: StorableObject, runtime: RuntimeDep) -> DeviceConfigRead:
    """Store the desired configuration and publish it retained on `dev/{id}/down/config`."""
    return await config.set_desired(runtime.sessions, runtime.config_publisher, runtime.failed_rows, device_id, desired)


@router.get("/{device_id}/config", responses=NOT_FOUND)
async def get_config(device_id: DeviceIdPath, runtime: RuntimeDep) -> DeviceConfigRead:
    """Desired and reported configuration, and whether they agree."""
    return await config.get_config(runtime.sessions, device_id)


@router.post("/{device_id}/certificate", status_code=status.HTTP_201_CREATED, responses=NOT_FOUND)
async def issue_certificate(
    device_id: DeviceIdPath, body: CertificateRequest, runtime: RuntimeDep
) -> CertificateIssued:
    """Sign the device's CSR (its CN is forced to the device id) or make a key pair for it."""
    return await service.issue_certificate(runtime.sessions, runtime.ca, runtime.settings, device_id, body.csr_pem)
