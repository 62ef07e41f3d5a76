"""The front's side of the registry when engines are replicas: leases, payloads, the pool view.

The front keeps the registry (the one writer) and resolves names as in one process; instead
of pinning a local slot, a lease carries an AdapterSource: the adapter's id, its sha256 and its
verified files in Ray's object store. `FleetPool` stands where the AdapterPool stands in one
process (the admin API, /metrics, the collector), built from the replicas' reports.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayTaskError

from loraplex.adapters_registry import (
    Adapter,
    AdapterCorrupt,
    AdapterNotFound,
    AdapterNotReady,
    AdapterRegistry,
    EntryState,
    NameInvalid,
    PoolConfig,
)
from loraplex.adapters_registry.catalog import SERVABLE
from loraplex.api import Principal
from loraplex.api.registry_bridge import RegistryResolver

from .board import FleetView
from .wire import AdapterSource


class AdapterPayloads:
    """Verified adapter files put into Ray's object store once per sha256, LRU-bounded.

    Dropping a reference here frees the object once no replica borrows it any more.
    """

    def __init__(self, registry: AdapterRegistry, max_entries: int) -> None:
        self.registry = registry
        self.max_entries = max_entries
        self._refs: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def source(self, adapter: Adapter) -> AdapterSource:
        """The adapter's source for replicas (reads and checks its files when not cached).

        :raises AdapterNotReady: the version is not servable.
        :raises AdapterCorrupt: its files changed on disk (the adapter is marked corrupt).
        """
        with self._lock:
            ref = self._refs.get(adapter.sha256)
            if ref is not None:
                self._refs.move_to_end(adapter.sha256)
        if ref is None:
            ref = ray.put(self._read(adapter))
            with self._lock:
                self._refs[adapter.sha256] = ref
                while len(self._refs) > self.max_entries:
                    self._refs.popitem(last=False)
        return AdapterSource(str(adapter.id), adapter.sha256, ref)

    def _read(self, adapter: Adapter) -> tuple[bytes, bytes]:
        if adapter.state not in SERVABLE:
            raise AdapterNotReady(f"adapter {adapter.name!r} is {adapter.state}")
        try:
            return self.registry.store.read(adapter.sha256)  # checks the sha256
        except AdapterCorrupt as exc:
            self.registry.catalog.mark_corrupt(adapter.sha256, str(exc))
            raise


@dataclass
class ReplicaLease:
    """An adapter resolved for one call; replicas pin their own slots from `source`."""

    source: AdapterSource
    in_flight: Counter
    slot: int | None = None  # no slot at the front
    released: bool = False

    @property
    def digest(self) -> str:
        return self.source.digest

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.in_flight[int(self.source.key)] -= 1


class ReplicaResolver(RegistryResolver):
    """RegistryResolver over a FleetPool: leases carry object-store sources, not slots."""

    pool: FleetPool

    def __init__(self, registry: AdapterRegistry, pool: FleetPool) -> None:
        super().__init__(registry, pool)  # the AdapterPool surface it reads
        self.payloads = pool.payloads
        self.in_flight = pool.in_flight

    async def acquire(self, principal: Principal, name: str) -> ReplicaLease | None:
        """None when the caller has no such adapter (another tenant's reads the same).

        :raises AdapterNotReady, AdapterCorrupt: as RegistryResolver.acquire.
        """
        if principal.tenant_id is None:
            return None
        try:
            adapter = await asyncio.to_thread(
                self.registry.resolve, principal.tenant_id, name
            )
        except (AdapterNotFound, NameInvalid):
            return None
        source = await asyncio.to_thread(self.payloads.source, adapter)
        self.in_flight[adapter.id] += 1
        lease = ReplicaLease(source, self.in_flight)
        try:
            await asyncio.to_thread(self.registry.catalog.touch, adapter.id)
        except BaseException:
            lease.release()
            raise
        return lease

    def room(self) -> tuple[int, int]:
        """Free device slots and idle resident ones, summed over the replicas."""
        free = idle = 0
        for report in self.pool.view.reports():
            taken = sum(e.slot is not None for e in report.pool)
            free += self.pool.per_replica.max_loras - taken
            idle += sum(e.on_device and e.pins == 0 for e in report.pool)
        return free, idle

    def slot_names(self, slots: Iterable[int]) -> list[str]:
        """Names of adapters by id: the replicas report adapter ids in place of slots."""
        names = []
        for adapter_id in slots:
            try:
                names.append(self.registry.catalog.get(int(adapter_id)).name)
            except AdapterNotFound:
                continue
        return names


class _FleetMetrics:
    def __init__(self, view: FleetView) -> None:
        self.view = view

    def snapshot(self) -> dict:
        """The replicas' PoolMetrics snapshots, summed."""
        total: dict = {}
        for report in self.view.reports():
            _add(total, report.pool_metrics)
        base = {"hits": {}, "misses": {}, "evictions": {}, "loads": {}, "failures": {}}
        return {
            **base,
            "bytes_moved": {},
            "latency_seconds": {},
            "exhausted": 0,
            **total,
        }


def _add(into: dict, more: dict) -> None:
    for key, value in more.items():
        if isinstance(value, dict):
            _add(into.setdefault(key, {}), value)
        else:
            into[key] = into.get(key, 0) + value


class _FleetHost:
    def __init__(self, view: FleetView) -> None:
        self.view = view

    def keys(self) -> list[int]:
        seen: dict[int, None] = {}
        for report in self.view.reports():
            for key, _ in report.host:
                seen[key] = None
        return list(seen)

    def bytes_of(self, key: Hashable) -> int:
        held = (b for r in self.view.reports() for k, b in r.host if k == key)
        return max(held, default=0)


@dataclass
class FleetPool:
    """The AdapterPool surface the admin API, /metrics and the collector use, over replicas.

    Reads come from the replicas' latest reports (one adapter held by several replicas is
    one entry: on a device if any holds it there, pins summed). Pin and prefetch go through
    Ray Serve's router like a request, so they land where the adapter is (or fits) best;
    unpin and evict reach every replica through the board.
    """

    view: FleetView
    payloads: AdapterPayloads
    handle: object  # the engine deployment's DeploymentHandle
    per_replica: PoolConfig
    # adapter id → calls at the front using it now (ReplicaResolver counts them)
    in_flight: Counter = field(default_factory=Counter)
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(
            2, thread_name_prefix="loraplex-fleet"
        )
    )

    def __post_init__(self) -> None:
        self.metrics = _FleetMetrics(self.view)
        self.host = _FleetHost(self.view)

    @property
    def config(self) -> PoolConfig:
        """Capacities summed over the live replicas."""
        n = max(1, len(self.view.reports()))
        c = self.per_replica
        return PoolConfig(
            max_loras=c.max_loras * n,
            max_cpu_loras=c.max_cpu_loras * n,
            max_cpu_bytes=c.max_cpu_bytes * n,
        )

    def snapshot(self) -> list[EntryState]:
        merged: dict[int, EntryState] = {}
        for report in self.view.reports():
            for e in report.pool:
                m = merged.get(e.key)
                merged[e.key] = (
                    e
                    if m is None
                    else EntryState(
                        e.key,
                        m.slot if m.slot is not None else e.slot,
                        m.on_device or e.on_device,
                        m.loading or e.loading,
                        max(m.host_bytes, e.host_bytes),
                        m.pins + e.pins,
                        m.admin_pinned or e.admin_pinned,
                    )
                )
        return list(merged.values())

    def in_use(self, key: Hashable) -> bool:
        """A call at the front uses it, or a replica pins or loads it."""
        if self.in_flight[int(key)] > 0:
            return True
        return any(e.key == key and (e.pins or e.loading) for e in self.snapshot())

    def residency(self, key: Hashable) -> str:
        """The best place any replica holds it: device, loading, host or disk."""
        entries = [e for e in self.snapshot() if e.key == key]
        if any(e.on_device for e in entries):
            return "device"
        if any(e.loading for e in entries):
            return "loading"
        return "host" if self.host.bytes_of(key) else "disk"

    def evict(self, key: Hashable) -> bool:
        if self.in_use(key):
            return False
        self.view.post("evict", int(key))
        return True

    def pin(self, key: Hashable, timeout: float | None = None) -> int:
        """Pin on one replica (the router's choice); returns that replica's slot."""
        source = self._source(key)
        call = self.handle.options(multiplexed_model_id=source.key).pin.remote(source)
        try:
            return call.result(timeout_s=timeout)
        except (
            RayTaskError
        ) as exc:  # PinLimitReached, PoolExhausted: without Ray's trace
            raise exc.cause from None

    def unpin(self, key: Hashable) -> bool:
        pinned = any(e.key == key and e.admin_pinned for e in self.snapshot())
        self.view.post("unpin", int(key))
        return pinned

    def prefetch(self, key: Hashable, to: str = "device") -> Future:
        """Load on one replica (the router's choice), in the background: reading the files
        for the object store happens there too, never on the caller's thread."""
        if to not in ("device", "host"):
            raise ValueError("prefetch to 'device' or 'host'")

        def run() -> None:
            source = self._source(key)
            call = self.handle.options(multiplexed_model_id=source.key)
            call.prefetch.remote(source, to).result()

        return self._executor.submit(run)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _source(self, key: Hashable) -> AdapterSource:
        registry = self.payloads.registry
        return self.payloads.source(registry.catalog.get(int(key)))
