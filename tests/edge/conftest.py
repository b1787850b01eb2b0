"""The edge for real: the stack's nginx (started by scripts/stack.sh services) in front of the app
served by uvicorn on the stack's app port, in this test process and event loop."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp

from app.settings import Settings
from tests.conftest import STACK_DIR, bearer


@pytest.fixture(scope="session")
async def edge_app(asgi_app: ASGIApp, stack_env: dict[str, str]) -> AsyncIterator[None]:
    """nginx's upstream: the session's in-process app (its lifespan already runs) served over real
    HTTP by uvicorn on the stack's app port."""
    config = uvicorn.Config(
        asgi_app, host="127.0.0.1", port=int(stack_env["SWARM_APP_PORT"]), lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:
            # uvicorn gives up on a port in use by exiting: say so instead of waiting.
            assert not serving.done(), f"uvicorn could not serve on port {config.port} (in use?)"
            await asyncio.sleep(0.05)
    yield
    server.should_exit = True
    await serving


@pytest.fixture(scope="session")
def edge_url(stack_env: dict[str, str]) -> str:
    return f"https://localhost:{stack_env['SWARM_NGINX_PORT']}"


@pytest.fixture(scope="session")
def edge_tls() -> ssl.SSLContext:
    """nginx's certificate is the stack's `nginx` server certificate: trust the stack's CA only."""
    return ssl.create_default_context(cafile=STACK_DIR / "pki" / "ca.crt")


@pytest.fixture(scope="session")
async def edge(edge_app: None, edge_url: str, edge_tls: ssl.SSLContext) -> AsyncIterator[httpx.AsyncClient]:
    """A client of nginx, with no token."""
    async with httpx.AsyncClient(base_url=edge_url, verify=edge_tls, timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
async def operator(
    edge_app: None, edge_url: str, edge_tls: ssl.SSLContext, settings: Settings
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the API through nginx, with an every-scope token."""
    async with httpx.AsyncClient(
        base_url=f"{edge_url}/api/v1", verify=edge_tls, headers=bearer(settings), timeout=30
    ) as client:
        yield client
