"""The AppError hierarchy and the one handler that renders RFC 9457 problem+json."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from swarm_device.protocol import ErrorCode

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


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
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return problem(422, "Invalid request", "The request does not match the schema.", request.url.path, errors=errors)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return problem(exc.status_code, str(exc.detail), str(exc.detail), request.url.path)


async def _database_error(request: Request, exc: Exception) -> Response:
    if not is_infrastructure_error(exc):
        log.error("request %s failed on the database", request.url.path, exc_info=exc)
        return problem(500, "Internal error", "The request failed on a database error.", request.url.path)
    # The database being unreachable is an outage to retry, not a bug: 503 with a hint.
    response = problem(503, "Database unavailable", "The database cannot be reached; retry later.", request.url.path)
    response.headers["Retry-After"] = "2"
    return response


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for error in (*INFRASTRUCTURE_ERRORS, DBAPIError):
        app.add_exception_handler(error, _database_error)
