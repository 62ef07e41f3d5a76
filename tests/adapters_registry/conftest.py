"""Fixtures of the registry tests: a tiny Llama, a PEFT adapter for it, an open registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from registry_files import TARGETS, AdapterFiles, open_registry, read_files

from checkpoints import save_random_adapter, save_tiny_model
from loraplex.platform import ModelSpec


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


@pytest.fixture
def registry(tmp_path, spec):
    reg = open_registry(tmp_path / "data", spec)
    yield reg
    reg.close()


@pytest.fixture
def tenant(registry):
    return registry.tenants.create("acme")
