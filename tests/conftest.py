"""Shared fixtures: markers, tiny random checkpoints, the demo assets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from checkpoints import ARCHITECTURES, save_tiny_model

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """The demo checkpoint and adapters, built once per test session (about 30 s on 2 cores)."""
    from loraplex.demo import build_demo

    cached = os.environ.get("LORAPLEX_TEST_DEMO_DIR")
    root = Path(cached) if cached else tmp_path_factory.mktemp("demo") / "assets"
    return build_demo(root, progress=False, log=lambda _: None)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch → a random tiny checkpoint directory, made once per session."""
    root = tmp_path_factory.mktemp("models")
    return {
        arch: save_tiny_model(root / arch, arch, seed=i)
        for i, arch in enumerate(ARCHITECTURES)
    }
