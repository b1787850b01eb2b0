"""The AppError hierarchy and the one handler that renders RFC 9457 problem+json."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from http import HTTPStatus
from typing import Any, ClassVar, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.storable_json import printable
from swarm_device.protocol import ErrorCode

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class Problem(BaseModel):
    """RFC 9457 problem details: the body of every error answer (`errors` lists a 422's fields)."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str


_PROBLEM_SCHEMA = Problem.model_json_schema()


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` documenting these error statuses as problem+json (routes and routers)."""
    return {
        status: {"description": HTTPStatus(status).phrase, "content": {PROBLEM_JSON: {"schema": _PROBLEM_SCHEMA}}}
        for status in statuses
    }


# What any API route may answer: a body that is not JSON (400), no or a bad token, a token
# without the scope, a request that does not match the schema, the database out of reach.
API_ERRORS = problem_responses(400, 401, 403, 422, 503)


class AppError(Exception):
    """An expected failure: carries its HTTP status and its device-protocol error code."""

    status: ClassVar[int] = 500
    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    title: ClassVar[str] = "Internal error"
    headers: ClassVar[Mapping[str, str]] = {}

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidInput(AppError):
    status = 422
    code = ErrorCode.INVALID
    title = "Invalid input"


class NotFound(AppError):
    status = 404
    code = ErrorCode.NOT_FOUND
    title = "Not found"


class Conflict(AppError):
    status = 409
    code = ErrorCode.CONFLICT
    title = "Conflict"


class Unauthorized(AppError):
    """No bearer token, or one that is not valid for us (RFC 6750)."""

    status = 401
    title = "Unauthorized"
    headers = {"WWW-Authenticate": 'Bearer realm="swarm-core"'}


class Forbidden(AppError):
    """A valid token without the scope that the operation needs."""

    status = 403
    title = "Forbidden"


class Unavailable(AppError):
    status = 503
    code = ErrorCode.INTERNAL
    title = "Service unavailable"


class BrokerAdminError(Unavailable):
    title = "Broker management API failed"


# Failures of the infrastructure, not of the request: answer 503 / retry the message later.
# asyncpg raises OSError (refused) and TimeoutError (connect) before SQLAlchemy wraps anything;
# SQLAlchemy's own TimeoutError means the pool had no connection to give within its timeout.
INFRASTRUCTURE_ERRORS: tuple[type[Exception], ...] = (
    OperationalError,
    InterfaceError,
    OSError,
    TimeoutError,
    PoolTimeout,
)
# asyncpg server errors that SQLAlchemy wraps as a plain DBAPIError, by SQLSTATE class: 08 the
# connection broke, 53 the server is out of resources, 57P the server shuts down or is starting.
_OUTAGE_SQLSTATES = ("08", "53", "57P")


def is_infrastructure_error(exc: BaseException) -> bool:
    """Whether `exc` means the database (or the network) failed, not the request: 503 or retry."""
    if isinstance(exc, INFRASTRUCTURE_ERRORS):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig.__cause__ if exc.orig is not None else None, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate.startswith(_OUTAGE_SQLSTATES)


T = TypeVar("T")


async def until_infrastructure_answers(call: Callable[[], Awaitable[T]], what: str) -> T:
    """`call()` again and again, backing off up to 5 s, while it fails on the infrastructure (a
    message being handled is held, unacknowledged, until the database is back); any other error
    is raised."""
    delay = 0.2
    while True:
        try:
            return await call()
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            log.warning("%s failed on infrastructure (%r); retrying", what, exc)
            delay = await back_off(delay)


async def back_off(delay: float) -> float:
    """Sleep `delay`; the next delay (doubled, at most 5 s)."""
    await asyncio.sleep(delay)
    return min(delay * 2, 5.0)


class FailedRows:
    """Rows a periodic job failed on for a reason other than the infrastructure (a row it cannot
    store, publish or change): each is logged once, with its error, and left out of that job's
    later rounds in this process, so that it neither blocks the other rows nor floods the log.
    Per process and bounded: a restart tries them again (and logs them once more)."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._keys: OrderedDict[tuple[str, Hashable], None] = OrderedDict()

    def of(self, job: str) -> list[Any]:
        """The keys `job` failed on, to leave out of its next round (of the job's own key type)."""
        return [key for kind, key in self._keys if kind == job]

    def add(self, job: str, key: Hashable, exc: BaseException) -> None:
        if (job, key) in self._keys:
            return
        log.error("%s: %r failed and is left out until a restart: %r", job, key, exc, exc_info=exc)
        self._keys[(job, key)] = None
        while len(self._keys) > self._size:
            self._keys.popitem(last=False)


def problem(status: int, title: str, detail: str, instance: str, **extra: Any) -> Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, "instance": instance}
    return Response(orjson.dumps(body | extra), status_code=status, media_type=PROBLEM_JSON)


async def _app_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    response = problem(exc.status, exc.title, exc.detail, request.url.path, **exc.extra)
    response.headers.update(exc.headers)
    return response


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # A location may name a key of the body, which may be the very string refused.
    errors = [
        {"loc": [printable(p) if isinstance(p, str) else p for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors()
    ]
    return problem(422, "Invalid request", "The request does not match the schema.", request.url.path, errors=errors)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    response = problem(exc.status_code, str(exc.detail), str(exc.detail), request.url.path)
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names the methods of one route; a path has one route per method here.
        response.headers["Allow"] = ", ".join(sorted(_allowed_methods(request)))
    return response


def _allowed_methods(request: Request) -> set[str]:
    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return methods


async def _database_error(request: Request, exc: Exception) -> Response:
    if not is_infrastructure_error(exc):
        log.error("request %s failed on the database", request.url.path, exc_info=exc)
        return problem(500, "Internal error", "The request failed on a database error.", request.url.path)
    # The database being unreachable is an outage to retry, not a bug: 503 with a hint.
    response = problem(503, "Database unavailable", "The database cannot be reached; retry later.", request.url.path)
    response.headers["Retry-After"] = "2"
    return response


class UnhandledErrors:
    """An exception no handler took (a bug) is logged and answered 500 problem+json here, and the
    connection stays usable. Past this point Starlette re-raises it to the server, and uvicorn
    then closes the connection: nginx, which keeps its upstream connections alive, had sent the
    next request on that connection already and answered it 502 (a POST is not retried)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            if started:
                # Half an answer went out: only closing the connection tells the client.
                raise
            log.exception("request %s %s failed", scope["method"], scope["path"])
            response = problem(500, "Internal error", "The request failed on an internal error.", scope["path"])
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_middleware(UnhandledErrors)
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for error in (*INFRASTRUCTURE_ERRORS, DBAPIError):
        app.add_exception_handler(error, _database_error)
