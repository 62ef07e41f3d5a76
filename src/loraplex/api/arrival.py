"""ArrivalStamp: when each HTTP request reached the app, so that a call's latency (time to
first token, setup) counts its body, authentication and tokenization too."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Receive, Scope, Send


class ArrivalStamp:
    """ASGI middleware: `request.state.arrived` = time.monotonic() on arrival."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["arrived"] = time.monotonic()
        await self.app(scope, receive, send)
