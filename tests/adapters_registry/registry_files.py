"""Helpers of the registry tests: adapters as bytes, hand-written safetensors, a registry."""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters_registry import (
    AdapterRegistry,
    RegistryConfig,
    UploadLimits,
    UploadPart,
)
from loraplex.platform import ModelSpec

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
TARGETS = ["q_proj", "v_proj", "down_proj"]


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter's two files as bytes."""

    config: bytes
    weights: bytes

    @property
    def config_json(self) -> dict:
        return json.loads(self.config)

    def parts(self) -> list[UploadPart]:
        return [
            UploadPart(CONFIG, io.BytesIO(self.config)),
            UploadPart(WEIGHTS, io.BytesIO(self.weights)),
        ]

    def with_config(self, **changes) -> AdapterFiles:
        return AdapterFiles(
            json.dumps({**self.config_json, **changes}).encode(), self.weights
        )


def read_files(path: Path) -> AdapterFiles:
    return AdapterFiles((path / CONFIG).read_bytes(), (path / WEIGHTS).read_bytes())


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    """A safetensors file written by hand, so that it can be wrong on purpose."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def open_registry(data_dir: Path, spec: ModelSpec, **options) -> AdapterRegistry:
    limits = options.pop(
        "limits", UploadLimits(max_upload_bytes=1 << 22, max_weights_bytes=1 << 22)
    )
    return AdapterRegistry(
        RegistryConfig(data_dir=data_dir, max_lora_rank=16, limits=limits, **options),
        spec,
    )
