"""One error shape on the wire: {"error": {"message", "type", "param", "code"}}.

Every failure the API reports goes through `ApiError` and the handlers installed by
`install_error_handlers`, so clients (the official `openai` package included) see the same body,
a meaningful status code, `Retry-After` where waiting helps, and `x-should-retry: false` where
retrying cannot.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.adapters_registry import (
    AdapterCorrupt,
    AdapterInvalid,
    AdapterNotFound,
    AdapterNotReady,
    AdapterTooLarge,
    NameInvalid,
    PinLimitReached,
    PoolClosed,
    PoolExhausted,
    RegistryBusy,
    RegistryError,
    TenantExists,
    TenantNotFound,
    UnsupportedFormat,
)

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_denied_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "unprocessable_entity_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}
_RETRYABLE = {429, 503}


class ApiError(Exception):
    """An error answered with `status` and the OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        if self.status not in _RETRYABLE:
            headers["x-should-retry"] = "false"
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(status: int, message: str, param: str | None, code: str | None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code if code is not None else str(status),
        }
    }


# Most specific first: the first class the error is an instance of decides its status.
_REGISTRY_STATUS: tuple[tuple[type[RegistryError], int, str], ...] = (
    (AdapterTooLarge, 413, "adapter_too_large"),
    (UnsupportedFormat, 415, "unsupported_format"),
    (AdapterInvalid, 422, "adapter_invalid"),
    (NameInvalid, 400, "invalid_name"),
    (AdapterNotFound, 404, "model_not_found"),
    (TenantNotFound, 404, "tenant_not_found"),
    (AdapterNotReady, 409, "adapter_not_ready"),
    (AdapterCorrupt, 409, "adapter_corrupt"),
    (TenantExists, 409, "tenant_exists"),
    (PinLimitReached, 409, "pin_limit"),
    (PoolExhausted, 503, "pool_exhausted"),
    (RegistryBusy, 503, "registry_busy"),
    (PoolClosed, 503, "shutting_down"),
)


def registry_error(exc: RegistryError) -> ApiError:
    """The HTTP form of a registry error."""
    for cls, status, code in _REGISTRY_STATUS:
        if isinstance(exc, cls):
            retry = None
            if status == 503:
                retry = max(1, round(getattr(exc, "retry_after_s", 1.0)))
            param = getattr(exc, "field", None)
            return ApiError(status, str(exc), code=code, param=param, retry_after=retry)
    return ApiError(500, "internal registry error; the server logged the details")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    """Route every error, including FastAPI's own and unexpected ones, to the one shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RegistryError)
    async def _registry(request: Request, exc: RegistryError) -> JSONResponse:
        error = registry_error(exc)
        if error.status == 500:
            log.error("registry error on %s: %r", request.url.path, exc)
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return ApiError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        response = ApiError(exc.status_code, message).response()
        response.headers.update(exc.headers or {})  # e.g. Allow on 405
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return ApiError(500, "internal error; the server logged the details").response()
