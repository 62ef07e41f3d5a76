"""BodySizeLimit: refuse request bodies over a cap with 413 while they stream in.

python-multipart spools whole uploads before a route sees them, so the cap sits in front of the
app: a declared Content-Length over the cap is refused before anything is read, and a body that
grows past the cap (chunked, or lying about its length) is answered 413 the moment it does; the
app then sees the client as gone, and whatever it tries to send is dropped.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError


class BodySizeLimit:
    """ASGI middleware: at most `max_bytes` of request body on every route."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self):
        message = f"request body over the limit of {self.max_bytes} bytes"
        return ApiError(413, message, code="too_large").response()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or {}).get(b"content-length")
        if (
            declared is not None
            and declared.isdigit()
            and int(declared) > self.max_bytes
        ):
            await self._error()(scope, receive, send)
            return
        seen = 0
        refused = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes and not response_started:
                    refused = True
                    await self._error()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused:
                return
            response_started = (
                response_started or message["type"] == "http.response.start"
            )
            await send(message)

        await self.app(scope, counting_receive, guarded_send)
