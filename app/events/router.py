from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from app.auth import Scope
from app.dependencies import RuntimeDep, requires
from app.errors import API_ERRORS
from app.events import service
from swarm_device.protocol import DEVICE_ID_PATTERN

router = APIRouter(tags=["events"], responses=API_ERRORS)


@router.get(
    "/events",
    dependencies=[requires(Scope.TASKS_READ)],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
)
async def events(
    runtime: RuntimeDep,
    device_id: Annotated[str | None, Query(pattern=DEVICE_ID_PATTERN)] = None,
    event_type: Annotated[
        list[str] | None,
        Query(alias="type", description="Event types (`task.succeeded`) or families (`task`, `device`)."),
    ] = None,
    heartbeat: Annotated[float, Query(ge=1, le=300, description="Seconds between keep-alive comments.")] = 15,
    last_event_id: Annotated[int | None, Header(alias="Last-Event-ID", ge=0)] = None,
) -> StreamingResponse:
    """Server-Sent Events of tasks (created, sent, in progress, progress, final) and devices
    (online, offline). A reconnecting client sends Last-Event-ID and gets what it missed."""
    # Fixed before the answer starts: events after the client's request are never skipped.
    after = last_event_id if last_event_id is not None else await service.current_position(runtime.sessions)
    frames = service.stream(
        runtime.sessions,
        runtime.changes,
        after=after,
        device_id=device_id,
        types=service.parse_types(event_type),
        heartbeat_s=heartbeat,
    )
    # No caching, and no buffering by nginx: events must leave at once.
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(frames, media_type="text/event-stream", headers=headers)
