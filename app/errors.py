"""The AppError hierarchy and the one handler that renders RFC 9457 problem+json."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from swarm_device.protocol import ErrorCode

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
INFRASTRUCTURE_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError, OSError, TimeoutError)


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


async def _database_down(request: Request, exc: Exception) -> Response:
    # The database being unreachable is an outage to retry, not a bug: 503 with a hint.
    response = problem(503, "Database unavailable", "The database cannot be reached; retry later.", request.url.path)
    response.headers["Retry-After"] = "2"
    return response


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # asyncpg raises OSError (refused) and TimeoutError (pool, connect) before SQLAlchemy wraps it.
    for error in INFRASTRUCTURE_ERRORS:
        app.add_exception_handler(error, _database_down)
