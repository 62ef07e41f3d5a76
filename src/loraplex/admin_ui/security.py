"""Sessions, CSRF and response headers of the admin UI.

- Signing in with the admin key starts a server-side session; its random id travels in an
  HttpOnly, SameSite=Strict cookie scoped to /admin (Secure over HTTPS). The key never does.
- Every state-changing request carries the session's CSRF token (a form field, or the
  X-CSRF-Token header of a fetch), compared in constant time; a cross-origin Origin is refused
  too. The sign-in form has its own token in a short-lived cookie (login CSRF).
- Every UI response carries a strict Content-Security-Policy: scripts and styles from our own
  static files only, so no inline script or style can run even if some text were not escaped.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request

from .sessions import Session

SESSION_COOKIE = "loraplex_admin"
SIGNIN_COOKIE = "loraplex_signin"  # the sign-in form's CSRF token, before any session
COOKIE_PATH = "/admin"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


class SignInRequired(Exception):
    """No live session: pages redirect to the sign-in form, JSON answers 401."""

    def __init__(self, wants_json: bool) -> None:
        super().__init__("sign in with the admin key")
        self.wants_json = wants_json


class CsrfRefused(Exception):
    """A state-changing request without this session's CSRF token (or from another origin)."""

    def __init__(self, wants_json: bool) -> None:
        super().__init__("missing or wrong CSRF token: reload the page and try again")
        self.wants_json = wants_json


def wants_json(request: Request) -> bool:
    """A `.json` twin, or a fetch from our own script (which asks for JSON)."""
    accept = request.headers.get("accept", "")
    return request.url.path.endswith(".json") or accept.startswith("application/json")


def secure_cookies(request: Request) -> bool:
    """Mark cookies Secure when the browser reached us over HTTPS (directly or via a proxy
    that says so); plain-HTTP setups on localhost would otherwise never keep the cookie."""
    forwarded = request.headers.get("x-forwarded-proto", "")
    return request.url.scheme == "https" or forwarded == "https"


def current_session(request: Request) -> Session:
    """The signed-in session of this request.

    :raises SignInRequired:
    """
    ui = request.app.state.admin_ui
    session = ui.sessions.get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        raise SignInRequired(wants_json(request))
    return session


SessionDep = Annotated[Session, Depends(current_session)]


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        # Browsers send Origin on every cross-origin POST; a missing one is a same-origin
        # navigation or a non-browser client, which the token below still has to pass.
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


def tokens_match(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison; empty or missing never matches."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


async def check_csrf(request: Request, session: Session) -> None:
    """:raises CsrfRefused: unless the request carries the session's token, same-origin."""
    given = request.headers.get(CSRF_HEADER)
    if given is None:
        form = await request.form()
        value = form.get(CSRF_FIELD)
        given = value if isinstance(value, str) else None
    if not (_same_origin(request) and tokens_match(session.csrf, given)):
        raise CsrfRefused(wants_json(request))


async def csrf_session(request: Request, session: SessionDep) -> Session:
    """A dependency for every state-changing route: a session and its CSRF token."""
    await check_csrf(request, session)
    return session


CsrfSessionDep = Annotated[Session, Depends(csrf_session)]


def new_signin_token() -> str:
    return secrets.token_urlsafe(32)


def safe_back(target: str | None, default: str = "/admin/overview") -> str:
    """A redirect target inside the UI only (never another host: no open redirect)."""
    if not target or not target.startswith("/admin"):
        return default
    if "//" in target or "\\" in target or any(ord(c) < 33 for c in target):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return target
