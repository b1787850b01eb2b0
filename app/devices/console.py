"""The console's device pages: the fleet (online, last seen, firmware/model, revoke) and one
device (its desired and reported configuration; its tasks come from the tasks page's fragment).
Rows refresh when the event stream says a device came online or went offline."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse

from app.auth import Principal, Scope
from app.console.pages import ConsolePage, NavEntry, render
from app.dependencies import RuntimeDep, requires
from app.devices import config, service
from app.tasks import console as tasks_console
from swarm_device.protocol import DEVICE_ID_PATTERN

router = APIRouter(prefix="/devices")

Admin = Annotated[Principal, requires(Scope.DEVICES_ADMIN)]
DeviceIdPath = Annotated[str, Path(pattern=DEVICE_ID_PATTERN)]

# The stream's device events that change what these pages show.
DEVICE_EVENTS = "sse:device.online, sse:device.offline"
PAGE_SIZE = 200


@router.get("")
async def devices_page(request: Request, principal: Admin) -> HTMLResponse:
    return render(request, "devices.html", principal, {"triggers": DEVICE_EVENTS})


@router.get("/rows")
async def device_rows(request: Request, principal: Admin, runtime: RuntimeDep) -> HTMLResponse:
    items, more = await service.list_devices(runtime.sessions, online=None, cursor=None, limit=PAGE_SIZE)
    return render(request, "_device_rows.html", principal, {"devices": items, "more": more is not None})


@router.get("/{device_id}")
async def device_page(device_id: DeviceIdPath, request: Request, principal: Admin, runtime: RuntimeDep) -> HTMLResponse:
    context = {
        "device": await service.get_device(runtime.sessions, device_id),
        "config": await config.get_config(runtime.sessions, device_id),
        "triggers": DEVICE_EVENTS,
        "task_triggers": tasks_console.TASK_EVENTS,
    }
    return render(request, "device.html", principal, context)


@router.get("/{device_id}/summary")
async def device_summary(
    device_id: DeviceIdPath, request: Request, principal: Admin, runtime: RuntimeDep
) -> HTMLResponse:
    context = {
        "device": await service.get_device(runtime.sessions, device_id),
        "config": await config.get_config(runtime.sessions, device_id),
    }
    return render(request, "_device_summary.html", principal, context)


@router.post("/{device_id}/revoke")
async def revoke(device_id: DeviceIdPath, request: Request, principal: Admin, runtime: RuntimeDep) -> HTMLResponse:
    device = await service.revoke_device(runtime.sessions, runtime.broker_admin, runtime.notifier, device_id)
    return render(request, "_flash.html", principal, {"message": f"Device {device.id} revoked."})


PAGE = ConsolePage(router, (NavEntry("Devices", "/devices", Scope.DEVICES_ADMIN),))
