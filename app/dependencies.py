"""What the lifespan builds and the request handlers receive: one typed Runtime, and the
principal of the request's bearer token (`requires(scope)` on a route checks it and its scope)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated, cast

from fastapi import Depends, Request, params
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from faststream.rabbit import RabbitBroker
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import HTTPConnection

from app.auth import (
    ANONYMOUS,
    CSRF_HEADER,
    SAFE_METHODS,
    SESSION_COOKIE,
    Principal,
    Scope,
    TokenVerifier,
    csrf_token,
    same_origin,
)
from app.db import Sessions
from app.devices.broker_admin import BrokerAdmin
from app.devices.config import RetainedPublisher
from app.errors import FailedRows, Forbidden, Unauthorized
from app.events.feed import ChangeFeed
from app.pki import CertificateAuthority
from app.settings import Settings
from app.tasks.intake import IntakeBatcher
from app.tasks.notifier import Notifier
from app.tasks.waiters import TaskWaiters


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: Sessions
    broker: RabbitBroker
    notifier: Notifier
    intake: IntakeBatcher
    waiters: TaskWaiters
    broker_admin: BrokerAdmin
    config_publisher: RetainedPublisher
    changes: ChangeFeed
    ca: CertificateAuthority
    tokens: TokenVerifier
    # What the periodic jobs failed on (app/scheduler.py): each row logged once, then left out.
    failed_rows: FailedRows = field(default_factory=FailedRows)


async def get_runtime(request: Request) -> Runtime:
    # async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread hop
    # per request for a dictionary lookup.
    return cast(Runtime, request.state.runtime)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


class _ScopedBearer(HTTPBearer):
    """The dependency `requires(scope)` adds: the request's bearer token is valid (401 otherwise)
    and carries `scope` (403 otherwise). An HTTPBearer, so OpenAPI lists the scheme and the scope
    with each operation. One dependency without sub-dependencies on purpose: FastAPI solves every
    node of a route's dependency tree on every request, and the tree this replaces (token, runtime,
    principal, scopes) was a fifth of the app's CPU per task creation."""

    def __init__(self, scope: Scope) -> None:
        super().__init__(
            auto_error=False,
            scheme_name="HTTPBearer",
            description="An operator token: `python -m app.cli token --help`.",
        )
        self.scope = scope

    async def __call__(self, request: HTTPConnection) -> Principal:  # type: ignore[override]
        principal = authenticate(cast(Runtime, request.state.runtime), request, await super().__call__(request))
        if self.scope not in principal.scopes:
            raise Forbidden(f"The token lacks the scope {self.scope}.", missing_scopes=[self.scope])
        return principal


def authenticate(
    runtime: Runtime, request: HTTPConnection, credentials: HTTPAuthorizationCredentials | None
) -> Principal:
    """A valid token's principal (Unauthorized otherwise); anybody when auth is off. The token is
    the bearer header's, else the console's session cookie's; a state-changing request made with
    the cookie must also come from our origin and carry the session's CSRF token."""
    if credentials is not None:
        return runtime.tokens.verify(credentials.credentials)
    session = request.cookies.get(SESSION_COOKIE)
    if session is not None:
        principal = runtime.tokens.verify(session)
        check_csrf(request, session)
        return principal
    if runtime.tokens.enabled:
        raise Unauthorized("A bearer token is required (Authorization: Bearer <token>).")
    return ANONYMOUS


def check_csrf(request: HTTPConnection, session: str) -> None:
    """Forbidden for a state-changing request made with the session cookie that is cross-site or
    lacks the session's CSRF token (SameSite=Strict already keeps the cookie off other sites'
    requests; this holds where SameSite does not, e.g. a sibling subdomain)."""
    if request.scope.get("method", "GET") in SAFE_METHODS:
        return
    headers = request.headers
    if not same_origin(headers.get("origin"), headers.get("host")):
        raise Forbidden("Cross-origin request refused.")
    if not hmac.compare_digest(headers.get(CSRF_HEADER, ""), csrf_token(session)):
        raise Forbidden(f"The {CSRF_HEADER} header is missing or wrong (a request made with the session cookie).")


def requires(scope: Scope) -> params.Security:
    """A route or router dependency: the request's token must be valid and carry `scope`. Every
    API route has one (tests/edge/test_app_auth.py checks it in the OpenAPI document)."""
    return params.Security(_ScopedBearer(scope), scopes=[scope])
