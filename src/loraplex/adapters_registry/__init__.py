"""What adapters exist, who owns them, and where each one lives now.

So far: validation of PEFT LoRA adapters into engine-ready LoraWeights. The catalog, ingest and
tiered pool come with the registry issue.
"""

from .errors import AdapterInvalid, RegistryError
from .validate import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterConfig,
    build_lora_weights,
    load_adapter_dir,
    parse_adapter_config,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterConfig",
    "AdapterInvalid",
    "RegistryError",
    "build_lora_weights",
    "load_adapter_dir",
    "parse_adapter_config",
]
