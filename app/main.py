"""create_app(settings) -> FastAPI: routers and error handlers. Entry point: create_app_from_env."""

from __future__ import annotations

import gc
import logging

from fastapi import FastAPI

from app import asyncapi, health
from app.console import pages, signin
from app.devices import console as devices_console
from app.devices import router as devices
from app.errors import install_error_handlers
from app.events import router as events
from app.lifespan import lifespan_for
from app.processes import router as processes
from app.settings import Settings, get_settings
from app.tasks import console as tasks_console
from app.tasks import router as tasks

API_PREFIX = "/api/v1"
# The operator console: server-rendered pages (app/console/pages.py), one entry per page.
CONSOLE_PAGES = (signin.PAGE, devices_console.PAGE, tasks_console.PAGE)


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="Swarm Core",
        summary="Asynchronous RPC core for IoT fleets: tasks in over HTTPS, devices pull them over MQTT.",
        version="0.1.0",
        lifespan=lifespan_for(settings),
        # No OpenTelemetry here (metrics are Prometheus, app/metrics.py): FastAPI's per-request
        # check for a configured provider and its spans around each step cost CPU for nothing.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    # Every API route needs a valid bearer token with the scope the route names (`requires`).
    # Included straight into the app: a router nested in an /api/v1 router is matched level by
    # level, on every request.
    for api in (devices.router, tasks.router, events.router, processes.router):
        app.include_router(api, prefix=API_PREFIX)
    pages.install(app, CONSOLE_PAGES)
    app.include_router(health.router)
    app.include_router(asyncapi.router)
    install_error_handlers(app)
    return app


def create_app_from_env() -> FastAPI:
    """The uvicorn factory: settings from APP_* variables."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Every scheduler run and every management API call at INFO would drown the log.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = create_app(get_settings())
    # Long-lived start-up objects need no scanning by the cyclic GC: shorter pauses under load.
    gc.freeze()
    return app
