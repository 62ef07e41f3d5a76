"""RegistryServices: the registry and its pool together, as the API and the admin UI use them."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .pool import AdapterPool
from .registry import AdapterRegistry


@dataclass
class RegistryServices:
    """The registry and its pool, as the adapter and admin routes use them."""

    registry: AdapterRegistry
    pool: AdapterPool

    def collect(self) -> list[int]:
        """Remove deleted adapters nothing uses any more, and drop them from the pool."""
        removed = self.registry.collect(self.pool.in_use)
        for adapter_id in removed:
            self.pool.evict(adapter_id)
        return removed

    def writable(self) -> bool:
        """The database answers and the data directory takes writes (readiness)."""
        try:
            self.registry.catalog.query("SELECT 1")
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False
        return os.access(self.registry.config.data_dir, os.W_OK)
