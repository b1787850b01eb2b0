"""The app checks the token itself, with scopes (nginx is not trusted to be the only gate):
401 / 403 as problem+json, straight to the in-process app."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute

from app.auth import Scope
from app.dependencies import _ScopedBearer
from app.main import CONSOLE_PAGES
from app.settings import Settings
from tests.conftest import bearer
from tests.tokens import REFUSED, new_signing_key, refused_tokens


@pytest.mark.parametrize("why", REFUSED)
async def test_the_app_refuses_flawed_tokens(
    app_client: httpx.AsyncClient, settings: Settings, tmp_path: Path, why: str
) -> None:
    token = refused_tokens(settings.auth, new_signing_key(tmp_path / "other.key"))[why]
    request = app_client.build_request("GET", "/tasks")
    if token is None:
        del request.headers["Authorization"]
    else:
        request.headers["Authorization"] = f"Bearer {token}"
    response = await app_client.send(request)
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["title"] == "Unauthorized"


@pytest.mark.parametrize(
    ("method", "path", "needed"),
    [
        ("GET", "/tasks", Scope.TASKS_READ),
        ("GET", "/tasks/00000000-0000-0000-0000-000000000000/events", Scope.TASKS_READ),
        ("POST", "/devices/no-such-device/tasks", Scope.TASKS_WRITE),
        ("POST", "/tasks/00000000-0000-0000-0000-000000000000/cancel", Scope.TASKS_WRITE),
        ("GET", "/devices", Scope.DEVICES_ADMIN),
        ("POST", "/devices", Scope.DEVICES_ADMIN),
    ],
)
async def test_each_route_needs_its_scope(
    app_client: httpx.AsyncClient, settings: Settings, method: str, path: str, needed: Scope
) -> None:
    others = [s for s in Scope if s != needed]
    refused = await app_client.request(method, path, headers=bearer(settings, *others), json={})
    assert refused.status_code == 403, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["missing_scopes"] == [needed]

    # The one scope is enough: past authorization (to validation, lookup or success).
    allowed = await app_client.request(method, path, headers=bearer(settings, needed), json={})
    assert allowed.status_code not in (401, 403), allowed.text


async def test_openapi_shows_the_bearer_scheme_on_the_api_only(app_client: httpx.AsyncClient) -> None:
    spec = (await app_client.get("http://swarm.test/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An operator token: `python -m app.cli token --help`.",
    }
    # The scope each operation needs is listed with the scheme.
    assert spec["paths"]["/api/v1/tasks"]["get"]["security"] == [{"HTTPBearer": ["tasks:read"]}]
    assert spec["paths"]["/api/v1/devices"]["post"]["security"] == [{"HTTPBearer": ["devices:admin"]}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    # No API route is left unguarded: its checker is what lists it (app/dependencies.py).
    for path, operations in spec["paths"].items():
        if path.startswith("/api/v1/"):
            for method, operation in operations.items():
                assert operation["security"][0]["HTTPBearer"], f"{method} {path}"


def test_every_console_route_but_sign_in_needs_a_scope() -> None:
    """The console's pages and actions are checked like the API's (they are not in the OpenAPI
    document, so the test above does not see them)."""
    public = {"", "/signin", "/signout"}
    routes = [r for page in CONSOLE_PAGES for r in page.router.routes if isinstance(r, APIRoute)]
    assert {r.path for r in routes} > public
    for route in routes:
        scopes = [dep.call.scope for dep in route.dependant.dependencies if isinstance(dep.call, _ScopedBearer)]
        assert bool(scopes) is (route.path not in public), route.path
