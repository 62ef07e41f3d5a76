"""The registry as the API sees it: keys → principals, adapter names → pinned engine slots."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

from loraplex.adapters_registry import (
    AdapterNotFound,
    AdapterPool,
    AdapterRegistry,
    AdminKeyStore,
    NameInvalid,
    RegistryError,
)

from .state import Principal


class RegistryAuthenticator:
    """The admin key, or a tenant's API key (hashed, compared in constant time)."""

    def __init__(self, registry: AdapterRegistry, admin: AdminKeyStore) -> None:
        self.registry = registry
        self.admin = admin

    def authenticate(self, api_key: str) -> Principal | None:
        if self.admin.matches(api_key):
            return Principal(None, is_admin=True)
        tenant = self.registry.tenants.authenticate(api_key)
        return None if tenant is None else Principal(tenant.id)


@dataclass
class PoolLease:
    """A pinned slot; `release` unpins it once. `digest`: the adapter's content sha256."""

    pool: AdapterPool
    adapter_id: int
    slot: int
    digest: str | None = None
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool.release(self.adapter_id)


class RegistryResolver:
    """Resolves `model` to the caller's newest ready adapter version and pins it in a slot."""

    def __init__(self, registry: AdapterRegistry, pool: AdapterPool) -> None:
        self.registry = registry
        self.pool = pool

    async def acquire(
        self, principal: Principal, name: str, wait_s: float | None = None
    ) -> PoolLease | None:
        """None when the caller has no such adapter (another tenant's reads the same).

        :param wait_s: how long to wait while every slot is pinned (default: the pool's).
        :raises AdapterNotReady: the caller's adapter exists but no version is servable.
        :raises PoolExhausted: every slot stayed pinned for the wait (retryable).
        """
        if principal.tenant_id is None:
            return None
        # One worker-thread hop for the three steps: under load each hop waits for a
        # thread and for the interpreter lock.
        return await asyncio.to_thread(self._acquire, principal.tenant_id, name, wait_s)

    def _acquire(
        self, tenant_id: str, name: str, wait_s: float | None
    ) -> PoolLease | None:
        try:
            adapter = self.registry.resolve(tenant_id, name)
        except (AdapterNotFound, NameInvalid):
            return None
        slot = self.pool.acquire(adapter.id, wait_s)
        lease = PoolLease(self.pool, adapter.id, slot, adapter.sha256)
        try:
            self.registry.catalog.touch(adapter.id)
        except BaseException:
            lease.release()
            raise
        return lease

    def locate(self, principal: Principal, name: str) -> int | None:
        """The id of the version `acquire` would pin, or None when it would answer None.

        :raises AdapterNotReady: the caller's adapter exists but no version is servable.
        """
        if principal.tenant_id is None:
            return None
        try:
            return self.registry.resolve(principal.tenant_id, name).id
        except (AdapterNotFound, NameInvalid):
            return None

    # Residency, for admission (api/admission.py).
    def residency(self, key: int) -> str:
        return self.pool.residency(key)

    def room(self) -> tuple[int, int]:
        entries = self.pool.snapshot()
        taken = sum(e.slot is not None for e in entries)
        idle = sum(e.on_device and e.pins == 0 for e in entries)
        return self.pool.config.max_loras - taken, idle

    def victim(self) -> int | None:
        idle = [e for e in self.pool.snapshot() if e.on_device and not e.admin_pinned]
        return min(idle, key=lambda e: e.pins).key if idle else None  # LRU first

    def prefetch(self, key: int, to: str) -> None:
        # A failed load surfaces when a request acquires the adapter; nothing waits here.
        with contextlib.suppress(RegistryError):
            self.pool.prefetch(key, to)

    def names(self, principal: Principal) -> list[str]:
        if principal.tenant_id is None:
            return []
        ready = self.registry.catalog.list_adapters(principal.tenant_id, ("ready",))
        return sorted({a.name for a in ready})

    def slot_names(self, slots: Iterable[int]) -> list[str]:
        by_slot = {e.slot: e.key for e in self.pool.snapshot() if e.slot is not None}
        names = []
        for slot in slots:
            if slot in by_slot:
                try:
                    names.append(self.registry.catalog.get(int(by_slot[slot])).name)
                except AdapterNotFound:
                    continue
        return names
