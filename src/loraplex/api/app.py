"""create_app: the FastAPI application over an engine thread and the adapter registry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import adapter_routes, admin_routes, openai_routes, ops_routes
from .arrival import ArrivalStamp
from .body_limit import BodySizeLimit
from .errors import install_error_handlers
from .loop_lag import LoopLagMonitor
from .state import ApiState


def create_app(state: ApiState, max_body_bytes: int = 1 << 30) -> FastAPI:
    """The HTTP API; `state` carries the engine client, the text processor and the registry."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        monitor = None
        if state.metrics is not None:
            monitor = LoopLagMonitor(state.metrics.loop_lag)
            monitor.start()
        try:
            yield
        finally:
            if monitor is not None:
                await monitor.stop()

    app = FastAPI(
        lifespan=lifespan,
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
