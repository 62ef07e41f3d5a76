"""The catalog's rows as frozen dataclasses, and the naming rule for tenants and adapters."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import NameInvalid

# SageMaker's adapter-id rule widened by "_": letters and digits at both ends, 1-63 characters.
NAME_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?")


def check_name(kind: str, name: object) -> str:
    """Return `name` if it follows NAME_PATTERN.

    :raises NameInvalid: saying what a name may contain.
    """
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise NameInvalid(
            f"{kind} name {name!r} is invalid: use 1-63 letters, digits, '-' or '_', "
            "starting and ending with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Tenant:
    """Someone who owns adapters and API keys."""

    id: str
    name: str
    created_at: float


@dataclass(frozen=True)
class ApiKey:
    """An API key's record; the key itself is shown once, at creation, and stored hashed."""

    id: int
    tenant_id: str
    prefix: str  # the first characters of the key, to tell keys apart in listings
    label: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None


@dataclass(frozen=True)
class Adapter:
    """One version of a tenant's adapter, in one of migrations.ADAPTER_STATES."""

    id: int
    tenant_id: str
    name: str
    version: int
    state: str
    base_model: str | None
    rank: int | None
    alpha: float | None
    targets: tuple[str, ...]
    size_bytes: int | None
    sha256: str | None  # content hash: see artifacts.content_digest
    upload_id: str
    error: str | None
    created_at: float
    updated_at: float
    last_used_at: float | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Adapter:
        fields = dict(row)
        fields["targets"] = tuple(json.loads(fields["targets"] or "[]"))
        return cls(**fields)


@dataclass(frozen=True)
class Event:
    """One line of the registry's event log."""

    id: int
    at: float
    kind: str  # one of migrations.EVENT_KINDS
    tenant_id: str | None
    adapter_id: int | None
    detail: str
