"""What the lifespan builds and the request handlers receive: one typed Runtime, and the
principal of the request's bearer token (`requires(scope)` on a route checks its scope)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, cast

from fastapi import Depends, Request, params
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from faststream.rabbit import RabbitBroker
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.auth import ANONYMOUS, Principal, Scope, TokenVerifier
from app.devices.broker_admin import BrokerAdmin
from app.devices.config import RetainedPublisher
from app.errors import Forbidden, Unauthorized
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
    sessions: async_sessionmaker[AsyncSession]
    broker: RabbitBroker
    notifier: Notifier
    intake: IntakeBatcher
    waiters: TaskWaiters
    broker_admin: BrokerAdmin
    config_publisher: RetainedPublisher
    changes: ChangeFeed
    ca: CertificateAuthority
    tokens: TokenVerifier


async def get_runtime(request: Request) -> Runtime:
    # async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread hop
    # per request for a dictionary lookup.
    return cast(Runtime, request.state.runtime)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


bearer = HTTPBearer(auto_error=False, description="An operator token: `python -m app.cli token --help`.")


async def authenticate(
    runtime: RuntimeDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    """Every API request: a valid bearer token (401 otherwise). Runs once per request."""
    if credentials is not None:
        return runtime.tokens.verify(credentials.credentials)
    if runtime.tokens.enabled:
        raise Unauthorized("A bearer token is required (Authorization: Bearer <token>).")
    return ANONYMOUS


async def authorize(security_scopes: SecurityScopes, principal: Annotated[Principal, Depends(authenticate)]) -> None:
    missing = sorted(set(security_scopes.scopes) - principal.scopes)
    if missing:
        raise Forbidden(f"The token lacks the scope {' '.join(missing)}.", missing_scopes=missing)


def requires(scope: Scope) -> params.Security:
    """A route or router dependency: the request's token must carry `scope` (403 otherwise)."""
    return params.Security(authorize, scopes=[scope])
