"""Jinja2 rendering (autoescape on) and the UI's responses, each with the security headers."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from .security import CSRF_FIELD, SECURITY_HEADERS
from .sessions import Session

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
NO_STORE = {**SECURITY_HEADERS, "Cache-Control": "no-store"}


def human_bytes(n: float | None) -> str:
    """1536 → '1.5 KiB'."""
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def timestamp(at: float | None) -> str:
    """Epoch seconds → 'YYYY-MM-DD HH:MM:SS UTC'."""
    if at is None:
        return "—"
    moment = dt.datetime.fromtimestamp(at, dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def short_timestamp(at: float | None) -> str:
    """Epoch seconds → 'YYYY-MM-DD HH:MM' (UTC), for dense tables."""
    if at is None:
        return "—"
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M")


def duration(seconds: float | None) -> str:
    """3725 → '1 h 2 min'."""
    if seconds is None or math.isnan(seconds):
        return "—"
    s = int(max(0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def millis(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} ms"


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.0f}%"


def query_string(query: dict, **changes: object) -> str:
    """The page's query with some values changed (empty values dropped), as '?a=1&b=2'."""
    merged = {**query, **changes}
    kept = {k: v for k, v in merged.items() if v not in ("", None)}
    return "?" + urlencode(kept) if kept else "?"


def make_environment() -> Environment:
    """The templates' environment: HTML always autoescaped, undefined names are errors."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        bytes=human_bytes,
        ts=timestamp,
        short_ts=short_timestamp,
        dur=duration,
        ms=millis,
        pct=percent,
    )
    env.globals.update(qs=query_string)
    return env


def render(
    request: Request,
    template: str,
    data: dict,
    session: Session | None,
    status: int = 200,
    **extra: object,
) -> HTMLResponse:
    """A page: the template over the page's data, the session's one-time messages and its
    CSRF token for the forms."""
    ui = request.app.state.admin_ui
    flashes = []
    if session is not None:
        flashes, session.flashes = session.flashes, []
    html = ui.env.get_template(template).render(
        data=data,
        flashes=flashes,
        csrf=session.csrf if session else "",
        csrf_field=CSRF_FIELD,
        path=request.url.path,
        full_path=request.url.path
        + (f"?{request.url.query}" if request.url.query else ""),
        signed_in=session is not None,
        **extra,
    )
    return HTMLResponse(html, status_code=status, headers=NO_STORE)


def json_response(data: object, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=NO_STORE)


def redirect(url: str) -> RedirectResponse:
    """303 See Other: after a POST, the browser GETs the page (no resubmission on reload)."""
    return RedirectResponse(url, status_code=303, headers=NO_STORE)


def error_json(status: int, message: str, code: str) -> JSONResponse:
    """The API's one error shape, so scripts handle UI and API errors alike."""
    body = {"error": {"message": message, "type": code, "param": None, "code": code}}
    return json_response(body, status)
