"""AdapterRegistry: tenants, adapters and their files in one data directory, end to end.

    registry = AdapterRegistry(RegistryConfig(data_dir=Path("/var/lib/loraplex")), spec)
    adapter = registry.ingest(tenant.id, "support-bot", [UploadPart(name, stream), ...])
    pool = registry.make_pool(PoolConfig(max_loras=8, max_cpu_loras=32), writer)
    slot = pool.acquire(registry.resolve(tenant.id, "support-bot").id)

Opening a registry locks its data directory for this process and runs the startup sweep.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.platform import LoraWeights, ModelSpec

from .artifacts import ADAPTER_FILES, ArtifactStore, UploadLimits, UploadPart
from .catalog import SERVABLE, Catalog
from .errors import AdapterCorrupt, AdapterNotFound, AdapterNotReady, RegistryError
from .pool import AdapterPool, PoolConfig
from .records import Adapter
from .slot_writer import SlotWriter
from .sweep import DB_NAME, SweepReport, lock_data_dir, sweep
from .tenants import Tenants
from .validate import validate_adapter_bytes, validate_adapter_files


@dataclass(frozen=True)
class RegistryConfig:
    """Where the registry lives and what it accepts (filled in by the CLI)."""

    data_dir: Path
    max_lora_rank: int = 64
    limits: UploadLimits = field(default_factory=UploadLimits)
    busy_timeout_s: float = 5.0
    key_touch_interval_s: float = (
        60.0  # how often an API key's last-used time is written
    )
    startup_hash_check: bool = False  # hash every stored adapter at startup (slow)


class AdapterRegistry:
    """The catalog, the tenants, the stored files, and how adapters get in and out."""

    def __init__(self, config: RegistryConfig, spec: ModelSpec) -> None:
        self.config = config
        self.spec = spec
        data_dir = Path(config.data_dir)
        self._lock_fd: int | None = lock_data_dir(data_dir)
        self.catalog = Catalog(data_dir / DB_NAME, config.busy_timeout_s)
        self.tenants = Tenants(self.catalog, config.key_touch_interval_s)
        self.store = ArtifactStore(data_dir)
        self._active: set[str] = set()  # upload ids in progress
        self._files = threading.Lock()  # store commits/removals vs. rows that use them
        self.startup_report: SweepReport = sweep(
            self.catalog, self.store, full_hash=config.startup_hash_check
        )

    def close(self) -> None:
        """Close the database and let go of the data directory."""
        self.catalog.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def ingest(self, tenant_id: str, name: str, parts: Sequence[UploadPart]) -> Adapter:
        """Store a new version of a tenant's adapter from an upload's streams.

        All or nothing: on any error the temp files are gone and the row is failed, with
        the reason, before this raises.
        :raises NameInvalid, TenantNotFound: before anything is read.
        :raises AdapterInvalid: (and its AdapterTooLarge, UnsupportedFormat) naming the cause.
        """
        adapter = self.catalog.begin_upload(tenant_id, name)
        self._active.add(adapter.upload_id)
        try:
            staged = self.store.receive(adapter.upload_id, parts, self.config.limits)
            self.catalog.set_validating(adapter.id, staged.size_bytes)
            checked = validate_adapter_files(
                *(staged.directory / n for n in ADAPTER_FILES),
                self.spec,
                self.config.max_lora_rank,
            )
            with self._files:
                digest = self.store.commit(staged)
                self.catalog.mark_ready(
                    adapter.id,
                    sha256=digest,
                    size_bytes=staged.size_bytes,
                    rank=checked.rank,
                    alpha=checked.config.alpha,
                    targets=checked.targets,
                    base_model=checked.config.base_model_name_or_path,
                )
        except BaseException as exc:
            self.store.discard(adapter.upload_id)
            reason = (
                str(exc) if isinstance(exc, RegistryError) else f"internal: {exc!r}"
            )
            self.catalog.mark_failed(adapter.id, reason)
            raise
        finally:
            self._active.discard(adapter.upload_id)
        return self.catalog.get(adapter.id)

    def resolve(self, tenant_id: str, name: str) -> Adapter:
        """The version of a tenant's adapter new requests use (see Catalog.resolve)."""
        return self.catalog.resolve(tenant_id, name)

    def load_weights(self, adapter_id: Hashable) -> LoraWeights:
        """Disk → host for the pool: read, check the sha256, validate again.

        :raises AdapterCorrupt: the files changed or vanished; the adapter is marked corrupt.
        :raises AdapterNotReady: the adapter is not servable (failed, corrupt, removed).
        """
        adapter = self.catalog.get(int(adapter_id))
        if adapter.state not in SERVABLE:
            raise AdapterNotReady(f"adapter {adapter.name!r} is {adapter.state}")
        try:
            config_bytes, weights_bytes = self.store.read(adapter.sha256)
        except AdapterCorrupt as exc:
            self.catalog.mark_corrupt(adapter.sha256, str(exc))
            raise
        return validate_adapter_bytes(
            config_bytes, weights_bytes, self.spec, self.config.max_lora_rank
        ).weights

    def delete(self, tenant_id: str, name: str) -> list[Adapter]:
        """Start deleting every version of a tenant's adapter (see `collect`).

        :raises AdapterNotFound:
        """
        return self.catalog.begin_delete(tenant_id, name)

    def delete_tenant(self, tenant_id: str) -> None:
        """Delete a tenant: keys revoked at once, every adapter deleting (see `collect`).

        :raises TenantNotFound:
        """
        self.tenants.delete(tenant_id)
        self._delete_adapters_of_deleted_tenants()

    def _delete_adapters_of_deleted_tenants(self) -> None:
        rows = self.catalog.query(
            "SELECT DISTINCT a.tenant_id, a.name FROM adapters a "
            "JOIN tenants t ON t.id = a.tenant_id WHERE t.deleted_at IS NOT NULL "
            "AND a.state IN ('ready', 'failed', 'corrupt')"
        )
        for row in rows:
            with contextlib.suppress(AdapterNotFound):
                self.catalog.begin_delete(row["tenant_id"], row["name"])

    def collect(self, in_use: Callable[[int], bool]) -> list[int]:
        """Remove deleting rows nothing uses any more, and files no row needs.

        :param in_use: whether the pool still holds an adapter id (AdapterPool.in_use).
        :returns: the removed adapter ids (evict them from the pool).
        """
        # Uploads that finished after their tenant was deleted are deleted now.
        self._delete_adapters_of_deleted_tenants()
        removed = []
        for adapter in self.catalog.list_adapters(states=("deleting",)):
            if in_use(adapter.id):
                continue
            with self._files:
                try:
                    self.catalog.remove(adapter.id, "removed: nothing was using it")
                except AdapterNotFound:
                    continue  # a concurrent collect (another upload or delete) won
                if (
                    adapter.sha256
                    and adapter.sha256 not in self.catalog.digests_in_use()
                ):
                    self.store.remove(adapter.sha256)
            removed.append(adapter.id)
        with (
            self.catalog.write() as db
        ):  # deleted tenants go with their last adapter row
            db.execute(
                "DELETE FROM tenants WHERE deleted_at IS NOT NULL "
                "AND id NOT IN (SELECT tenant_id FROM adapters)"
            )
        return removed

    def pool_event(self, kind: str, key: Hashable, detail: str) -> None:
        """A pool listener that writes loads, evictions and pins to the event log."""
        self.catalog.log_event(kind, int(key), detail)

    def make_pool(self, config: PoolConfig, writer: SlotWriter) -> AdapterPool:
        """A pool keyed by adapter id, loading through this registry."""
        return AdapterPool(config, writer, self.load_weights, self.pool_event)
