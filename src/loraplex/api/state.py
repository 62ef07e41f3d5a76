"""What the API's routes share: its config, the engine client, and the registry behind protocols."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request

from .engine_client import InferenceClient
from .metrics import ApiMetrics
from .text import TextProcessor


@dataclass(frozen=True)
class ApiConfig:
    """Limits and names of the HTTP API (built by the CLI from flags, env and file)."""

    served_model_name: str
    max_model_len: int
    max_num_seqs: int = 64
    max_queued_requests: int = 256
    max_concurrent_per_tenant: int = 64
    max_n: int = 8
    max_logprobs: int = 20
    max_stop: int = 16
    max_stop_length: int = 256
    max_prompts: int = 32
    share_base_prefix_across_tenants: bool = False  # base-only cached KV, shared by all


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant (by id), or the admin."""

    tenant_id: str | None
    is_admin: bool = False

    @property
    def label(self) -> str:
        return "admin" if self.is_admin else str(self.tenant_id)


class AdapterLease(Protocol):
    """A pinned adapter slot for the duration of one request.

    A lease may also carry `digest`, the adapter's content sha256, which names its cached KV;
    requests under a lease without one are not prefix-cached. A lease of engine replicas has
    no slot (None): each replica pins one itself, from what the lease carries.
    """

    slot: int | None

    def release(self) -> None:
        """Unpin the slot; calling it twice is harmless."""


class AdapterResolver(Protocol):
    """The registry as the inference routes see it."""

    async def acquire(self, principal: Principal, name: str) -> AdapterLease | None:
        """Pin a slot holding the caller's adapter `name`, loading it if needed; None if the
        caller has no such adapter (another tenant's adapter is answered the same way)."""

    def names(self, principal: Principal) -> list[str]:
        """The caller's servable adapter names."""

    def slot_names(self, slots: Iterable[int]) -> list[str]:
        """The names of the adapters in these slots (for metrics)."""


class Authenticator(Protocol):
    def authenticate(self, api_key: str) -> Principal | None:
        """The principal of a valid key, or None (missing, wrong and revoked keys alike)."""


@dataclass
class ApiState:
    config: ApiConfig
    client: InferenceClient  # EngineClient, or a client of engine replicas
    text: TextProcessor
    resolver: AdapterResolver
    authenticator: Authenticator
    metrics: ApiMetrics
    registry: Any = (
        None  # RegistryServices; None when serving without a registry (tests)
    )
    started_at: float = field(default_factory=time.time)
    active_by_tenant: Counter[str] = field(default_factory=Counter)
    draining: bool = False


def get_state(request: Request) -> ApiState:
    return request.app.state.api
