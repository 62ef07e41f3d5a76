"""What the API's routes share: its config, the engine client, and the registry behind protocols."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request

from .admission import Admission
from .admission_types import AdmissionConfig, AllResident
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
    max_concurrent_per_tenant: int = 64  # calls running or waiting, per tenant
    tenant_token_rate: float = 0.0  # prompt + max_tokens per second (0: no limit)
    tenant_token_burst: int = 0  # tokens a tenant may save up (0: ten seconds' worth)
    adapter_wait_s: float = 10.0  # a call waits this long for an adapter slot, then 503
    max_adapter_bypass: int = 16  # calls that may start ahead of one waiting for a slot
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
    # Built from config and resolver (so dataclasses.replace builds a new one).
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        c = self.config
        admission = AdmissionConfig(
            seats=c.max_num_seqs,
            max_queued=c.max_queued_requests,
            max_per_tenant=c.max_concurrent_per_tenant,
            tenant_token_rate=c.tenant_token_rate,
            tenant_token_burst=c.tenant_token_burst,
            max_bypass=c.max_adapter_bypass,
            adapter_wait_s=c.adapter_wait_s,
            preempt=getattr(self.client, "can_preempt", False),
        )
        knows_residency = all(
            hasattr(self.resolver, name)
            for name in ("residency", "room", "prefetch", "victim")
        )
        residency = self.resolver if knows_residency else AllResident()
        self.admission = Admission(admission, residency)
        if self.metrics is not None:
            self.metrics.watch_admission(self.admission)


def get_state(request: Request) -> ApiState:
    return request.app.state.api
