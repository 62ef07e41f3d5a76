"""The engine with the Triton paged attention (in Triton's interpreter on the CPU) gives the tokens
the torch reference gives: chunked prompts that mix with decodes, a prompt that starts on a cached
prefix, GQA, a head_dim that is not a power of two (24, as Qwen3's tiny model has) and a sliding
window (Mistral's tiny model: 12)."""

from __future__ import annotations

import functools

import pytest
from engine_utils import greedy, run_to_completion

from checkpoints import save_tiny_model
from interpreter import INTERPRETING, run_in_interpreter
from loraplex.platform import Engine, EngineConfig


def test_engine_with_triton_attention_in_the_interpreter():
    """Runs the case below in a child process with TRITON_INTERPRET=1."""
    assert "1 passed" in run_in_interpreter(__file__)


def test_triton_attention_matches_the_reference(tmp_path, monkeypatch):
    if not INTERPRETING:
        pytest.skip("runs in the TRITON_INTERPRET=1 child")
    from loraplex.platform import attention
    from loraplex.platform.model import llama

    model = save_tiny_model(tmp_path / "m", "mistral", seed=7, head_dim=24)
    shared_prefix = list(range(40, 60))
    plan = {
        "long": (list(range(3, 40)), greedy(5), None),  # chunked over 3 steps
        "short": ([9, 8, 7], greedy(6), None),
        "one": ([11], greedy(4), None),
        "prefix-a": (shared_prefix + [1, 2], greedy(3), None),
        "prefix-b": (shared_prefix + [5], greedy(3), None),
    }
    query_lens = []  # per Triton call: the query length of every sequence

    def triton_attention(q, k, v, kv, inputs, scale, sliding_window):
        query_lens.append(inputs.query_start_loc.diff().tolist())
        return attention.paged_attention(
            q, k, v, kv, inputs, scale, sliding_window, backend="triton"
        )

    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setattr(
            llama,
            "paged_attention",
            functools.partial(attention.paged_attention, backend="torch")
            if backend == "torch"
            else triton_attention,
        )
        config = EngineConfig(
            model=str(model),
            dtype="float32",
            device="cpu",
            max_loras=0,
            max_num_batched_tokens=16,
        )
        results.append(run_to_completion(Engine(config), plan))
    assert results[0] == results[1]
    assert any(1 in lens and max(lens) > 1 for lens in query_lens), "no mixed step"
