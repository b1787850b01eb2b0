"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from sqlalchemy import text

from app import metrics
from app.dependencies import RuntimeDep
from app.errors import problem_responses

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


@router.get("/healthz")
async def healthz() -> Health:
    """The process is up (it may still be unable to reach its database or broker)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(runtime: RuntimeDep) -> Response:
    """Ready to serve: the database answers and the broker connection is up."""
    checks = {"database": "ok", "broker": "ok"}
    try:
        async with asyncio.timeout(2):
            async with runtime.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    if not await runtime.broker.ping(timeout=2):
        checks["broker"] = "unavailable"
    ready = all(v == "ok" for v in checks.values())
    body = Health(status="ok" if ready else "unavailable", checks=checks)
    return Response(body.model_dump_json(), status_code=200 if ready else 503, media_type="application/json")


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}, **problem_responses(503)},
)
async def prometheus_metrics(runtime: RuntimeDep) -> Response:
    """Prometheus metrics: tasks by state, durations, consumer errors, dead letters, connected devices."""
    return Response(await metrics.exposition(runtime.sessions), media_type=CONTENT_TYPE_LATEST)
