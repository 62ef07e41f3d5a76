"""The engine with the Triton SGMV kernels (in Triton's interpreter on the CPU) gives the tokens
that the torch reference gives, for a batch mixing three adapters and the base model."""

from __future__ import annotations

import pytest
from engine_utils import greedy, run_to_completion

from checkpoints import save_random_adapter, save_tiny_model
from interpreter import INTERPRETING, run_in_interpreter
from loraplex.adapters_registry import load_adapter_dir
from loraplex.platform import Engine, EngineConfig


def test_engine_with_triton_kernels_in_the_interpreter():
    """Runs the case below in a child process with TRITON_INTERPRET=1."""
    assert "1 passed" in run_in_interpreter(__file__)


def test_triton_backend_matches_the_reference(tmp_path):
    if not INTERPRETING:
        pytest.skip("runs in the TRITON_INTERPRET=1 child")
    model = save_tiny_model(tmp_path / "m", "qwen3", seed=5)
    specs = [(4, ["q_proj", "v_proj"]), (8, ["o_proj", "down_proj"]), (16, ["k_proj"])]
    adapters = [
        save_random_adapter(model, tmp_path / f"a{i}", rank, targets, seed=i)
        for i, (rank, targets) in enumerate(specs)
    ]
    plan = {
        f"r{i}": (list(range(3 + i, 9 + 2 * i)), greedy(4), slot)
        for i, slot in enumerate([0, None, 1, 2, 0])
    }
    results = []
    for backend in ("torch", "triton"):
        config = EngineConfig(
            model=str(model),
            dtype="float32",
            device="cpu",
            max_loras=3,
            max_lora_rank=16,
            lora_backend=backend,
        )
        engine = Engine(config)
        for slot, path in enumerate(adapters):
            engine.load_adapter(slot, load_adapter_dir(path, engine.spec, 16))
        results.append(run_to_completion(engine, plan))
    assert results[0] == results[1]
