"""Sign-in and sign-out: the operator pastes an API token (`python -m app.cli token`), the app
checks it and keeps it in the session cookie, which then authenticates the console's pages, its
actions and its EventSource at nginx and here exactly like the bearer header (app/dependencies.py)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.auth import SESSION_COOKIE, Scope, same_origin
from app.console.pages import PREFIX, ConsolePage, form_fields, templates
from app.dependencies import RuntimeDep
from app.errors import AppError, Forbidden

router = APIRouter()

# Where a signed-in operator lands: the first page their scopes open.
LANDING = {Scope.DEVICES_ADMIN: "/devices", Scope.TASKS_READ: "/tasks"}


def _check_origin(request: Request) -> None:
    # No session yet, hence no CSRF token: the Origin check keeps other sites from signing the
    # browser in with their own token (login CSRF) or out.
    if not same_origin(request.headers.get("origin"), request.headers.get("host")):
        raise Forbidden("Cross-origin request refused.")


@router.get("/signin")
async def signin_form(request: Request) -> HTMLResponse:
    return templates.TemplateResponse(request, "signin.html", {"prefix": PREFIX})


@router.post("/signin")
async def signin(request: Request, runtime: RuntimeDep) -> Response:
    """Check the pasted token and keep it in the session cookie until the token expires."""
    _check_origin(request)
    token = (await form_fields(request)).get("token", "").strip()
    try:
        principal = runtime.tokens.verify(token)
    except AppError as exc:
        context = {"prefix": PREFIX, "error": exc.detail}
        return templates.TemplateResponse(request, "signin.html", context, status_code=exc.status)
    landing = next((path for scope, path in LANDING.items() if scope in principal.scopes), "/tasks")
    response = RedirectResponse(f"{PREFIX}{landing}", status_code=status.HTTP_303_SEE_OTHER)
    max_age = None if principal.expires_at is None else max(int(principal.expires_at - time.time()), 0)
    response.set_cookie(SESSION_COOKIE, token, max_age=max_age, path="/", secure=True, httponly=True, samesite="strict")
    return response


@router.post("/signout")
async def signout(request: Request) -> Response:
    _check_origin(request)
    signin_page = f"{PREFIX}/signin"
    # htmx would follow a redirect inside its request: HX-Redirect has the browser itself go there.
    if "HX-Request" in request.headers:
        response: Response = Response(status_code=status.HTTP_204_NO_CONTENT, headers={"HX-Redirect": signin_page})
    else:
        response = RedirectResponse(signin_page, status_code=status.HTTP_303_SEE_OTHER)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


@router.get("")
async def home() -> Response:
    # nginx sends a request without a valid session to the sign-in page before it gets here.
    return RedirectResponse(f"{PREFIX}/devices", status_code=status.HTTP_303_SEE_OTHER)


PAGE = ConsolePage(router)
