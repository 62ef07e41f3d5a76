"""What adapters exist, who owns them, and where each one lives now.

- validate / adapter_config / safetensors_header: PEFT adapters checked in a fixed order.
- catalog / tenants / migrations / records: the SQLite registry (sqlite-utils).
- artifacts / archive: uploads streamed to disk, content-addressed, all or nothing.
- pool / host_tier / packed / slot_writer / pool_metrics: the host and device tiers.
- sweep: crash recovery, `verify` and `gc`; registry: all of it behind one object.

Names are imported lazily, so that importing the validator or the pool does not need
sqlite-utils (the GPU benchmark hosts do not have it).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import (
    AdapterCorrupt,
    AdapterInvalid,
    AdapterLoadError,
    AdapterNotFound,
    AdapterNotReady,
    AdapterTooLarge,
    NameInvalid,
    PinLimitReached,
    PoolClosed,
    PoolExhausted,
    RegistryBusy,
    RegistryError,
    TenantExists,
    TenantNotFound,
    UnsupportedFormat,
)

_LAZY = {
    "ADAPTER_CONFIG": "adapter_config",
    "AdapterConfig": "adapter_config",
    "parse_adapter_config": "adapter_config",
    "ADAPTER_WEIGHTS": "validate",
    "ValidatedAdapter": "validate",
    "build_lora_weights": "validate",
    "load_adapter_dir": "validate",
    "validate_adapter_bytes": "validate",
    "validate_adapter_files": "validate",
    "ArtifactStore": "artifacts",
    "UploadLimits": "artifacts",
    "UploadPart": "artifacts",
    "Catalog": "catalog",
    "Tenants": "tenants",
    "Adapter": "records",
    "ApiKey": "records",
    "Event": "records",
    "Tenant": "records",
    "AdapterPool": "pool",
    "EntryState": "pool",
    "PoolConfig": "pool",
    "PoolMetrics": "pool_metrics",
    "DirectSlotWriter": "slot_writer",
    "EngineThreadSlotWriter": "slot_writer",
    "SlotWriter": "slot_writer",
    "AdapterRegistry": "registry",
    "AdminKeyStore": "admin_key",
    "RegistryServices": "services",
    "RegistryConfig": "registry",
    "SweepReport": "sweep",
    "VerifyReport": "sweep",
    "gc": "sweep",
    "verify": "sweep",
}

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "Adapter",
    "AdapterConfig",
    "AdapterCorrupt",
    "AdapterInvalid",
    "AdapterLoadError",
    "AdapterNotFound",
    "AdapterNotReady",
    "AdapterPool",
    "AdapterRegistry",
    "AdapterTooLarge",
    "AdminKeyStore",
    "ApiKey",
    "ArtifactStore",
    "Catalog",
    "DirectSlotWriter",
    "EngineThreadSlotWriter",
    "EntryState",
    "Event",
    "NameInvalid",
    "PinLimitReached",
    "PoolClosed",
    "PoolConfig",
    "PoolExhausted",
    "PoolMetrics",
    "RegistryBusy",
    "RegistryConfig",
    "RegistryError",
    "RegistryServices",
    "SlotWriter",
    "SweepReport",
    "Tenant",
    "TenantExists",
    "TenantNotFound",
    "Tenants",
    "UnsupportedFormat",
    "UploadLimits",
    "UploadPart",
    "ValidatedAdapter",
    "VerifyReport",
    "build_lora_weights",
    "gc",
    "load_adapter_dir",
    "parse_adapter_config",
    "validate_adapter_bytes",
    "validate_adapter_files",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
