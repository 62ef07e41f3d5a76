"""The engine on a CUDA GPU with the Triton paged attention gives the tokens that the torch
reference attention gives on the same GPU (fp32), eagerly and with decode CUDA graphs: chunked
prompts mixed with decodes, a prompt that starts on a cached prefix, a sliding window (12) and a
head_dim that is not a power of two (24)."""

from __future__ import annotations

import functools

import pytest
import torch
from engine_utils import greedy, run_to_completion

from checkpoints import save_tiny_model
from loraplex.platform import Engine, EngineConfig

pytestmark = pytest.mark.gpu


def _plan():
    gen = torch.Generator().manual_seed(11)
    shared = torch.randint(0, 256, (40,), generator=gen).tolist()
    lengths = [70, 5, 33, 129, 1, 48]
    plan = {
        f"r{i}": (torch.randint(0, 256, (n,), generator=gen).tolist(), greedy(12), None)
        for i, n in enumerate(lengths)
    }
    plan["prefix-a"] = (shared + [1, 2, 3], greedy(6), None)
    plan["prefix-b"] = (shared + [4], greedy(6), None)
    return plan


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_triton_attention_matches_the_reference_on_cuda(
    tmp_path, monkeypatch, enforce_eager
):
    from loraplex.platform import attention
    from loraplex.platform.model import llama

    model = save_tiny_model(
        tmp_path / "m", "mistral", seed=4, head_dim=24, hidden_size=128
    )
    results = []
    for backend, eager in (("torch", True), ("triton", enforce_eager)):
        # The reference reads lengths to the host: it runs eagerly, never in a graph.
        monkeypatch.setattr(
            llama,
            "paged_attention",
            functools.partial(attention.paged_attention, backend=backend),
        )
        config = EngineConfig(
            model=str(model),
            dtype="float32",
            device="cuda",
            max_loras=0,
            max_num_batched_tokens=64,
            num_kv_blocks=256,
            enforce_eager=eager,
        )
        engine = Engine(config)
        results.append(run_to_completion(engine, _plan()))
        if not eager:
            assert engine.runner.decode_graphs.num_replays > 0
        del engine
        torch.cuda.empty_cache()
    assert results[0] == results[1]
