"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .auth import AdminDep
from .schemas import ErrorResponse
from .state import get_state

router = APIRouter(tags=["ops"])


@router.get("/livez")
async def livez() -> dict:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready to serve: the engine runs and the server is not draining (503 otherwise)."""
    state = get_state(request)
    checks = {
        "engine": state.client.alive,
        "not_draining": not state.draining,
    }
    if state.registry is not None:
        checks["registry"] = await asyncio.to_thread(state.registry.writable)
    ready = all(checks.values())
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Alias of /readyz."""
    return await readyz(request)


@router.get(
    "/metrics",
    response_class=Response,
    responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
)
async def metrics(request: Request, _: AdminDep) -> Response:
    """Prometheus text format (admin key): vLLM-compatible series and loraplex's own."""
    registry = get_state(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
