"""Fixtures of the reliability tests: a forkserver that has imported the server once, adapter
files for the demo model, and a tenant's key."""

from __future__ import annotations

import hashlib
import multiprocessing
from dataclasses import dataclass

import pytest

from loraplex.adapters_registry.artifacts import content_digest
from loraplex.loadgen import BaseShapes, random_adapter

# What the server imports lazily at its first request is imported here once, so that a
# forked server starts in about 0.1 s. (Python 3.11's forkserver imports these before it
# sets sys.path: installed modules only; the tests' own child module is imported by each
# child.)
PRELOAD = [
    "loraplex.serve",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.llama.configuration_llama",
    "transformers.tokenization_utils_tokenizers",
    "uvicorn.lifespan.on",
    "uvicorn.loops.auto",
    "uvicorn.protocols.http.h11_impl",
    "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.websockets.auto",
]


@pytest.fixture(scope="session")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


@dataclass(frozen=True)
class Content:
    """An adapter's two files and the sha256 the registry gives them."""

    config: bytes
    weights: bytes

    @property
    def sha256(self) -> str:
        return content_digest(
            {
                "adapter_config.json": hashlib.sha256(self.config).hexdigest(),
                "adapter_model.safetensors": hashlib.sha256(self.weights).hexdigest(),
            }
        )

    def files(self) -> dict:
        return {
            "config": ("adapter_config.json", self.config),
            "weights": ("adapter_model.safetensors", self.weights),
        }


@pytest.fixture(scope="session")
def contents(demo_assets) -> list[Content]:
    """Six valid random adapters of the demo model (ranks 4 and 8)."""
    shapes = BaseShapes.from_model_dir(demo_assets.model)
    return [
        Content(*random_adapter(shapes, 4 + 4 * (i % 2), seed=i, dtype="float16"))
        for i in range(6)
    ]


@pytest.fixture(scope="session")
def invalid(demo_assets) -> Content:
    """Rank 64: over the servers' --max-lora-rank 32 (422 after the whole upload)."""
    return Content(*random_adapter(BaseShapes.from_model_dir(demo_assets.model), 64, 9))


def pytest_collection_modifyitems(config, items):
    # The long runs (100 SIGKILL trials, the 3-minute soak) are for `pytest -m slow`; the
    # default run has shorter versions of them.
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="a long run: use -m slow")
    for item in items:
        if "slow" in item.keywords and "reliability" in str(item.fspath):
            item.add_marker(skip)
