"""Authentication as a FastAPI dependency, added to every router (no path-prefix middleware)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError
from .state import Principal, get_state

_bearer = HTTPBearer(
    auto_error=False, description="API key: `Authorization: Bearer <key>`"
)


def require_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller; a missing, wrong or revoked key all get the same 401."""
    principal = None
    if credentials is not None and credentials.scheme.lower() == "bearer":
        principal = get_state(request).authenticator.authenticate(
            credentials.credentials
        )
    if principal is None:
        raise ApiError(401, "invalid or missing API key", code="invalid_api_key")
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(require_principal)]


def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise ApiError(403, "this route needs the admin key", code="forbidden")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
