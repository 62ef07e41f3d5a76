"""AdminUi: the UI's own runtime (sessions, history, templates), and mounting it on the app."""

from __future__ import annotations

import threading
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from . import actions, pages, routes
from .history import History
from .render import STATIC, error_json, make_environment, redirect, render
from .security import SECURITY_HEADERS, CsrfRefused, SignInRequired
from .sessions import SessionStore, SignInThrottle
from .state import AdminUiState


class AdminUi:
    """What the UI keeps between requests: sessions, sign-in throttle, recent load history."""

    def __init__(self, state: AdminUiState) -> None:
        self.state = state
        self.sessions = SessionStore(state.session_idle_s, state.session_max_s)
        self.throttle = SignInThrottle()
        self.history = History()
        self.env = make_environment()
        self._memory: dict | None = None
        self._memory_lock = threading.Lock()

    def memory(self) -> dict:
        """The engine's memory split; its tensors never change size, so it is read once."""
        with self._memory_lock:
            if self._memory is None:
                self._memory = pages.memory_split(self.state)
            return self._memory


class _Static(StaticFiles):
    """The UI's CSS and JS, with the same headers as its pages (revalidated on each load)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update({**SECURITY_HEADERS, "Cache-Control": "no-cache"})
        return response


async def _sign_in_required(request: Request, exc: SignInRequired) -> Response:
    if exc.wants_json:
        return error_json(401, str(exc), "invalid_session")
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET":
        target = "/admin/overview"
    return redirect(f"/admin/login?next={quote(target, safe='/')}")


async def _csrf_refused(request: Request, exc: CsrfRefused) -> Response:
    if exc.wants_json:
        return error_json(403, str(exc), "csrf_failed")
    return render(request, "error.html", {"message": str(exc)}, None, 403)


def mount_admin_ui(app: FastAPI, state: AdminUiState) -> AdminUi:
    """Serve the UI under /admin on `app` (the admin JSON API under /admin/api is untouched)."""
    ui = AdminUi(state)
    app.state.admin_ui = ui
    app.include_router(routes.router)
    app.include_router(actions.router)
    app.mount("/admin/static", _Static(directory=STATIC), name="admin-static")
    app.add_exception_handler(SignInRequired, _sign_in_required)
    app.add_exception_handler(CsrfRefused, _csrf_refused)
    return ui
