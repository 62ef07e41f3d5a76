"""The OpenAI-compatible HTTP API: inference tagged with adapters, adapter upload, tenants, metrics."""

from .app import create_app
from .engine_client import EngineClient
from .errors import ApiError
from .state import (
    AdapterLease,
    AdapterResolver,
    ApiConfig,
    ApiState,
    Authenticator,
    Principal,
)
from .text import TextProcessor

__all__ = [
    "AdapterLease",
    "AdapterResolver",
    "ApiConfig",
    "ApiError",
    "ApiState",
    "Authenticator",
    "EngineClient",
    "Principal",
    "TextProcessor",
    "create_app",
]
