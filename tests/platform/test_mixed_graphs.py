"""Mixed graphs: steps with prompt chunks through the static, padded buffers of MixedGraphs give
the eager engine's tokens.

On the CPU nothing is captured, but `MixedGraphs(capture=False)` runs the model on the very
buffers, padding sequences and padding tokens a replay reads, so what is checked here is what a
replay computes; test_engine_gpu.py checks capture and replay on a GPU.
"""

from __future__ import annotations

import pytest
from engine_utils import run_to_completion
from test_cuda_graphs import adapters, make_engine, plan  # noqa: F401 - the fixture

from loraplex.platform import EngineConfig, SamplingParams
from loraplex.platform.mixed_graphs import MixedGraphs, mixed_buckets


def with_mixed_graphs(engine, buckets=(8, 16, 24)):
    """The engine of `make_engine`, its steps with prompt chunks through MixedGraphs."""
    runner = engine.runner
    runner.mixed_graphs = MixedGraphs(
        engine.model,
        engine.kv_cache,
        buckets=buckets,
        max_seqs=engine.config.max_num_seqs,
        max_blocks_per_seq=runner.max_blocks_per_seq,
        max_model_len=engine.max_model_len,
        max_loras=engine.config.max_loras,
        device=engine.device,
        capture=False,
    )
    return engine


@pytest.mark.parametrize(
    ("num", "slots", "graphs"),
    [
        (3, [0, 1, 2], False),  # every request its own adapter; decodes eager
        (7, [0, None, 1, 0, None, 2, 2], True),  # with decode graphs too
        (5, [None], False),  # base only: the graph without LoRA launches
        (
            12,
            [2, 0, None, 1],
            True,
        ),  # prompts over several chunks of the 24-token budget
    ],
)
def test_mixed_graph_buffers_give_the_eager_tokens(adapters, num, slots, graphs):  # noqa: F811
    model_dir, dirs = adapters
    requests = plan(num, seed=10 + num, slots=slots, max_tokens=8)
    eager = run_to_completion(make_engine(model_dir, dirs, graphs=False), requests)
    engine = with_mixed_graphs(make_engine(model_dir, dirs, graphs=graphs))
    assert run_to_completion(engine, requests) == eager
    mixed = engine.runner.mixed_graphs
    assert mixed.num_replays > 0
    kinds = engine.step_times.steps
    assert (
        kinds["chunk_graph"].steps == mixed.num_replays and kinds["prefill"].steps == 0
    )


def test_a_bucket_filled_exactly_and_steps_too_large_for_the_buckets(adapters):  # noqa: F811
    """A step of exactly 8 tokens leaves no padding token; steps above the largest bucket
    (12 here, with a 24-token budget) run eagerly; both give the eager tokens."""
    model_dir, dirs = adapters
    requests = {
        "a": ([5, 6, 7, 8, 9, 10, 11, 12], SamplingParams(max_tokens=4), 0),
        "b": (list(range(30, 50)), SamplingParams(max_tokens=4), 1),
    }
    eager = run_to_completion(make_engine(model_dir, dirs, graphs=False), requests)
    engine = with_mixed_graphs(make_engine(model_dir, dirs, graphs=False), (8, 12))
    got = run_to_completion(engine, requests)
    assert got == eager
    kinds = engine.step_times.steps
    assert kinds["prefill"].steps >= 1  # the 28-token first step
    assert kinds["chunk_graph"].steps == engine.runner.mixed_graphs.num_replays


def test_mixed_graphs_survive_preemption_and_seeded_sampling(adapters):  # noqa: F811
    model_dir, dirs = adapters
    requests = plan(8, seed=6, slots=[0, 1, None, 2], max_tokens=12)
    for rid, (prompt, _, slot) in list(requests.items())[::2]:
        requests[rid] = (prompt, SamplingParams(max_tokens=12, seed=3, top_k=20), slot)
    options = {"num_kv_blocks": 20, "max_model_len": 64}
    eager = run_to_completion(
        make_engine(model_dir, dirs, graphs=False, **options), requests
    )
    engine = with_mixed_graphs(make_engine(model_dir, dirs, graphs=True, **options))
    assert run_to_completion(engine, requests) == eager
    assert engine.scheduler.num_preemptions > 0
    assert engine.runner.mixed_graphs.num_replays > 0


def test_buckets_and_the_option():
    assert mixed_buckets(2048) == (
        *range(128, 1025, 128),
        1280,
        1536,
        1792,
        2048,
    )
    assert mixed_buckets(600) == (128, 256, 384, 512, 600)
    assert mixed_buckets(100) == (100,)
    with pytest.raises(ValueError, match="mixed_graph_max_tokens"):
        EngineConfig(model="m", mixed_graph_max_tokens=-1)
    # The default: 4096 tokens on one GPU, capped by the step budget; off under tensor
    # parallelism; an explicit value wins, 0 included.
    assert EngineConfig(model="m").mixed_graph_tokens == 2048
    assert (
        EngineConfig(model="m", max_num_batched_tokens=8192).mixed_graph_tokens == 4096
    )
    assert EngineConfig(model="m", tensor_parallel_size=2).mixed_graph_tokens == 0
    assert EngineConfig(model="m", mixed_graph_max_tokens=0).mixed_graph_tokens == 0
    tp_on = EngineConfig(model="m", tensor_parallel_size=2, mixed_graph_max_tokens=512)
    assert tp_on.mixed_graph_tokens == 512
