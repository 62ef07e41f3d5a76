"""The registry's errors: one class per failure, each message naming what is wrong and the fix.

The API maps them to status codes: AdapterInvalid → 422 (AdapterTooLarge → 413,
UnsupportedFormat → 415), AdapterNotFound → 404, AdapterNotReady and AdapterCorrupt → 409,
NameInvalid → 400, PoolExhausted → 503 with Retry-After (the one retryable error).
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base class of the adapter registry's errors."""

    retryable = False


class AdapterInvalid(RegistryError, ValueError):
    """An adapter that cannot be served: bad config, unsupported PEFT feature, wrong tensors.

    `field` names the config field or tensor at fault, when there is one.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class AdapterTooLarge(AdapterInvalid):
    """The upload, or one file in it, is over its size cap (counted while streaming)."""


class UnsupportedFormat(AdapterInvalid):
    """Files other than adapter_config.json + adapter_model.safetensors, pickles, bad archives."""


class NameInvalid(RegistryError, ValueError):
    """A tenant or adapter name that does not follow the naming pattern."""


class TenantNotFound(RegistryError, LookupError):
    """No tenant with that id."""


class TenantExists(RegistryError):
    """A tenant with that name exists already."""


class AdapterNotFound(RegistryError, LookupError):
    """No such adapter for this tenant (another tenant's adapter reads exactly the same)."""


class AdapterNotReady(RegistryError):
    """The adapter exists but cannot be served now (uploading, failed, corrupt, deleting)."""


class AdapterCorrupt(RegistryError):
    """A stored adapter's files no longer match their sha256; the row is marked corrupt."""


class AdapterLoadError(RegistryError):
    """Moving an adapter between tiers failed (I/O, device memory); nothing was left half-loaded."""


class PoolExhausted(RegistryError):
    """Every device slot is pinned by running requests: retry after `retry_after_s` seconds."""

    retryable = True

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PinLimitReached(RegistryError):
    """An operator tried to pin more adapters than the pool allows (max_pinned)."""


class PoolClosed(RegistryError):
    """The pool is shut down; nothing more loads."""


class RegistryBusy(RegistryError):
    """Another process holds the data directory (a running server); stop it first."""
