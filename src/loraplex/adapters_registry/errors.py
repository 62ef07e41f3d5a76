"""The registry's errors. Each message names the field or tensor at fault and how to fix it."""

from __future__ import annotations


class RegistryError(Exception):
    """Base class of the adapter registry's errors."""


class AdapterInvalid(RegistryError, ValueError):
    """An adapter that cannot be served: bad config, unsupported PEFT feature, wrong tensors."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
