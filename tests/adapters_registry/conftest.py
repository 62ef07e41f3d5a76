"""Fixtures of the registry tests: a tiny Llama, a PEFT adapter for it, an open registry."""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from checkpoints import save_random_adapter, save_tiny_model
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


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("registry") / "llama", "llama2")


@pytest.fixture(scope="session")
def spec(model_dir) -> ModelSpec:
    return ModelSpec.from_dir(model_dir)


@pytest.fixture(scope="session")
def adapter_dirs(model_dir, tmp_path_factory) -> dict[str, Path]:
    """Three random PEFT adapters of the tiny model: rank 8, 4 and 16."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": save_random_adapter(model_dir, root / "a", 8, TARGETS, seed=1),
        "b": save_random_adapter(
            model_dir, root / "b", 4, ["o_proj", "up_proj"], seed=2
        ),
        "c": save_random_adapter(
            model_dir,
            root / "c",
            16,
            [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            seed=3,
        ),
    }


@pytest.fixture(scope="session")
def good(adapter_dirs) -> AdapterFiles:
    return read_files(adapter_dirs["a"])


def open_registry(data_dir: Path, spec: ModelSpec, **options) -> AdapterRegistry:
    limits = options.pop(
        "limits", UploadLimits(max_upload_bytes=1 << 22, max_weights_bytes=1 << 22)
    )
    return AdapterRegistry(
        RegistryConfig(data_dir=data_dir, max_lora_rank=16, limits=limits, **options),
        spec,
    )


@pytest.fixture
def registry(tmp_path, spec):
    reg = open_registry(tmp_path / "data", spec)
    yield reg
    reg.close()


@pytest.fixture
def tenant(registry):
    return registry.tenants.create("acme")
