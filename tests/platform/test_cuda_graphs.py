"""Decode graphs: the static buffers, padding and bucket choice give the eager engine's tokens.

On the CPU the graphs are not captured, but `DecodeGraphs(capture=False)` runs the model on the
very buffers and padding a replay reads, so what is checked here is what a replay computes; the
GPU test (test_engine_gpu.py) checks capture and replay themselves.
"""

from __future__ import annotations

import pytest
import torch
from engine_utils import greedy, run_to_completion

from checkpoints import save_random_adapter
from loraplex.adapters_registry import load_adapter_dir
from loraplex.platform import Engine, EngineConfig, SamplingParams
from loraplex.platform.cuda_graphs import DecodeGraphs, default_buckets

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("graph-adapters")
    model_dir = tiny_models["llama2"]
    return model_dir, [
        save_random_adapter(model_dir, root / f"a{r}", r, TARGETS, seed=r)
        for r in (4, 8, 16)
    ]


def make_engine(model_dir, adapter_dirs, graphs: bool, **options) -> Engine:
    config = EngineConfig(
        model=str(model_dir),
        dtype="float32",
        device="cpu",
        max_loras=4,
        max_lora_rank=16,
        block_size=4,
        max_num_seqs=12,
        max_num_batched_tokens=24,
        **options,
    )
    engine = Engine(config)
    for slot, path in enumerate(adapter_dirs):
        engine.load_adapter(slot, load_adapter_dir(path, engine.spec, 16))
    if graphs:
        runner = engine.runner
        runner.decode_graphs = DecodeGraphs(
            engine.model,
            engine.kv_cache,
            buckets=(1, 2, 4, 8),  # 12 running requests also take the eager path
            max_blocks_per_seq=runner.max_blocks_per_seq,
            max_model_len=engine.max_model_len,
            max_loras=config.max_loras,
            device=engine.device,
            capture=False,
        )
    return engine


def plan(num: int, seed: int, slots: list[int | None], max_tokens: int):
    gen = torch.Generator().manual_seed(seed)
    return {
        f"r{i}": (
            torch.randint(
                0, 256, (int(torch.randint(2, 30, (1,), generator=gen)),)
            ).tolist(),
            greedy(max_tokens),
            slots[i % len(slots)],
        )
        for i in range(num)
    }


@pytest.mark.parametrize(
    ("num", "slots"),
    [
        (3, [0, 1, 2]),  # every request its own adapter
        (7, [0, None, 1, 0, None, 2, 2]),  # adapters and base mixed, padded buckets
        (5, [None]),  # base only: the graph without LoRA launches
        (12, [2, 0, None, 1]),  # more running than the largest bucket at first
    ],
)
def test_graph_buffers_give_the_eager_tokens(adapters, num, slots):
    model_dir, dirs = adapters
    requests = plan(num, seed=num, slots=slots, max_tokens=10)
    eager = run_to_completion(make_engine(model_dir, dirs, graphs=False), requests)
    engine = make_engine(model_dir, dirs, graphs=True)
    got = run_to_completion(engine, requests)
    assert got == eager
    assert engine.runner.decode_graphs.num_replays > 0


def test_graph_buffers_survive_preemption_and_seeded_sampling(adapters):
    model_dir, dirs = adapters
    requests = plan(8, seed=5, slots=[0, 1, None, 2], max_tokens=12)
    for rid, (prompt, _, slot) in list(requests.items())[::2]:
        requests[rid] = (prompt, SamplingParams(max_tokens=12, seed=7, top_k=20), slot)
    # 20 blocks of 4 tokens cannot hold 8 requests of up to 41 tokens: preemption happens.
    eager_engine = make_engine(
        model_dir, dirs, graphs=False, num_kv_blocks=20, max_model_len=64
    )
    eager = run_to_completion(eager_engine, requests)
    engine = make_engine(
        model_dir, dirs, graphs=True, num_kv_blocks=20, max_model_len=64
    )
    assert run_to_completion(engine, requests) == eager
    assert engine.scheduler.num_preemptions > 0


def test_bucket_choice():
    assert default_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert default_buckets(3) == (1, 2, 3)
    assert default_buckets(128)[-3:] == (96, 112, 128)
    assert default_buckets(100)[-2:] == (96, 100)


def test_graphs_and_compiled_fusions_are_off_on_the_cpu(adapters):
    """(On CUDA, test_engine_gpu.py checks that enforce_eager turns the graphs off.)"""
    model_dir, dirs = adapters
    engine = make_engine(model_dir, dirs, graphs=False)
    assert engine.runner.decode_graphs is None
    assert not engine.model.norm.fusions.compiled
    assert engine.runner.memory_plan is None  # no GPU to plan: the CPU default KV size
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(model=str(model_dir), gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(model=str(model_dir), gpu_memory_utilization=0)
