"""The UI's pages and their `.json` twins (GET), and signing in and out.

Each page is built by one function of pages.py in a worker thread (it reads SQLite and takes the
pool's lock), then rendered by its template or returned as JSON: the same dict either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response

from . import pages
from .render import json_response, redirect, render
from .security import (
    COOKIE_PATH,
    SESSION_COOKIE,
    SIGNIN_COOKIE,
    CsrfSessionDep,
    SessionDep,
    new_signin_token,
    safe_back,
    secure_cookies,
    tokens_match,
)

router = APIRouter(tags=["admin-ui"], include_in_schema=False)
SIGNIN_TOKEN_S = 3600  # how long a sign-in form stays usable


def _ui(request: Request):
    return request.app.state.admin_ui


@router.get("/admin")
@router.get("/admin/")
async def home() -> Response:
    return redirect("/admin/overview")


@router.get("/admin/login")
async def signin_form(request: Request, next: str = "") -> Response:
    """The sign-in form; a signed-in browser goes straight on."""
    if _ui(request).sessions.get(request.cookies.get(SESSION_COOKIE)):
        return redirect(safe_back(next))
    return _signin_page(request, next, None, 200)


def _signin_page(request: Request, next: str, error: str | None, status: int):
    token = new_signin_token()
    response = render(
        request,
        "login.html",
        {"next": safe_back(next)},
        None,
        status,
        signin_token=token,
        error=error,
    )
    response.set_cookie(
        SIGNIN_COOKIE,
        token,
        max_age=SIGNIN_TOKEN_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=secure_cookies(request),
    )
    return response


@router.post("/admin/login")
async def sign_in(
    request: Request,
    key: Annotated[str, Form(max_length=1024)] = "",
    csrf_token: Annotated[str, Form(max_length=256)] = "",
    next: Annotated[str, Form(max_length=2048)] = "",
) -> Response:
    """Check the admin key; start a session (a new id: no fixation) or say no."""
    ui = _ui(request)
    client = request.client.host if request.client else "?"
    if not tokens_match(request.cookies.get(SIGNIN_COOKIE), csrf_token):
        return _signin_page(request, next, "The form expired: sign in again.", 403)
    if ui.throttle.blocked(client):
        return _signin_page(
            request, next, "Too many failed sign-ins: wait a few minutes.", 429
        )
    if not key or not ui.state.admin_keys.matches(key):
        ui.throttle.failed(client)
        return _signin_page(request, next, "That is not the admin key.", 401)
    ui.sessions.end(request.cookies.get(SESSION_COOKIE))
    token, _ = ui.sessions.create()
    response = redirect(safe_back(next))
    response.set_cookie(
        SESSION_COOKIE,
        token,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=secure_cookies(request),
    )
    response.delete_cookie(SIGNIN_COOKIE, path=COOKIE_PATH)
    return response


@router.post("/admin/logout")
async def sign_out(request: Request, session: CsrfSessionDep) -> Response:
    """End the session on the server and forget the cookie."""
    _ui(request).sessions.end(request.cookies.get(SESSION_COOKIE))
    response = redirect("/admin/login")
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response


def _page(name: str, build: Callable[[Request], dict]) -> None:
    """Register /admin/<name> (HTML) and /admin/<name>.json from one builder."""

    async def html(request: Request, session: SessionDep) -> Response:
        data = await asyncio.to_thread(build, request)
        return render(request, f"{name}.html", data, session, page=name)

    async def twin(request: Request, session: SessionDep) -> Response:
        return json_response(await asyncio.to_thread(build, request))

    html.__doc__ = twin.__doc__ = build.__doc__
    router.add_api_route(f"/admin/{name}", html, methods=["GET"], name=f"ui_{name}")
    router.add_api_route(
        f"/admin/{name}.json", twin, methods=["GET"], name=f"ui_{name}_json"
    )


def _overview(request: Request) -> dict:
    ui = _ui(request)
    return pages.overview(ui.state, ui.history)


def _tenants(request: Request) -> dict:
    return pages.tenants(_ui(request).state)


def _adapters(request: Request) -> dict:
    query = pages.AdapterQuery.parse(dict(request.query_params))
    return pages.adapters(_ui(request).state, query)


def _pool(request: Request) -> dict:
    ui = _ui(request)
    return pages.pool(ui.state, ui.memory())


def _events(request: Request) -> dict:
    params = request.query_params
    before = params.get("before", "")
    return pages.events(
        _ui(request).state,
        tenant=params.get("tenant", ""),
        adapter=params.get("adapter", ""),
        kind=params.get("kind", ""),
        before=int(before) if before.isdigit() and len(before) < 18 else None,
    )


for _name, _build in (
    ("overview", _overview),
    ("tenants", _tenants),
    ("adapters", _adapters),
    ("pool", _pool),
    ("events", _events),
):
    _page(_name, _build)
