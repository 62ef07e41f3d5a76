"""create_app: the FastAPI application over an engine thread and the adapter registry."""

from __future__ import annotations

from fastapi import FastAPI

from . import adapter_routes, admin_routes, openai_routes, ops_routes
from .arrival import ArrivalStamp
from .body_limit import BodySizeLimit
from .errors import install_error_handlers
from .state import ApiState


def create_app(state: ApiState, max_body_bytes: int = 1 << 30) -> FastAPI:
    """The HTTP API; `state` carries the engine client, the text processor and the registry."""
    app = FastAPI(
        title="loraplex",
        summary="OpenAI-compatible serving of one base model with many tenants' LoRA adapters.",
        version="0.1.0",
    )
    app.state.api = state
    install_error_handlers(app)
    app.include_router(ops_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(adapter_routes.router)
    app.include_router(admin_routes.router)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(ArrivalStamp)  # added last: outermost, so it stamps first
    return app
