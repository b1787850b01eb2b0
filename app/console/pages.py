"""How the console is put together: pages are (router, navigation entries) pairs that the
composition root lists (`install(app, pages)` in app/main.py). A later page, e.g. the business
processes' work list, is one more ConsolePage in that list: its own router and templates, the
shared layout (base.html) and the navigation come with it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from app.auth import SESSION_COOKIE, Principal, Scope, csrf_token

PREFIX = "/console"
STATIC_DIR = Path(__file__).parent / "static"

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")


@dataclass(frozen=True)
class NavEntry:
    """A link in the console's navigation, shown to whoever holds `scope` (what its page needs)."""

    title: str
    path: str
    scope: Scope


@dataclass(frozen=True)
class ConsolePage:
    router: APIRouter
    nav: tuple[NavEntry, ...] = ()


def install(app: FastAPI, pages: Sequence[ConsolePage]) -> None:
    """Include the pages' routes under PREFIX, the vendored static files, and the navigation."""
    for page in pages:
        app.include_router(page.router, prefix=PREFIX, include_in_schema=False)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=STATIC_DIR), name="console-static")
    app.state.console_nav = tuple(entry for page in pages for entry in page.nav)


def render(
    request: Request, template: str, principal: Principal, context: Mapping[str, Any] | None = None, status: int = 200
) -> HTMLResponse:
    """A console template with what the layout needs: the navigation this principal may use and
    the session's CSRF token (htmx sends it with every request, base.html)."""
    nav = cast(tuple[NavEntry, ...], request.app.state.console_nav)
    session = request.cookies.get(SESSION_COOKIE)
    layout = {
        "principal": principal,
        "nav": [entry for entry in nav if entry.scope in principal.scopes],
        "csrf_token": csrf_token(session) if session else "",
        "prefix": PREFIX,
    }
    return templates.TemplateResponse(request, template, layout | dict(context or {}), status_code=status)


async def form_fields(request: Request) -> dict[str, str]:
    """An urlencoded form (what htmx and plain forms send), last value of each field."""
    return dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
