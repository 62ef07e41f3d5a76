"""The multi-block decode expand on a CUDA GPU against float64 (pytest -m gpu).

The decode shapes of benchmarks/bench_sgmv.py (Llama-3.1-8B LoRA linears at rank 16, T = 1, 16,
64, 256 tokens, one adapter per token), in bf16 and fp32, plus a share of base-only tokens; the
configs the benchmark sweeps; mixed ranks; a CUDA graph replayed on batches unlike the captured
one; each with B in both layouts (out-major, and rank-major as the slot pool holds it). v is the
float64 shrink rounded to float32, NaN wherever not owned.
"""

from __future__ import annotations

import pytest
import torch
from sgmv_cases import (
    B_LAYOUTS,
    expected_y,
    make_problem,
    poisoned_v,
    relative_error,
)

from loraplex.kernels.sgmv import LoraSegmentBuffers, build_segments
from loraplex.kernels.sgmv.expand import sgmv_expand
from loraplex.kernels.sgmv.expand_blocks import DECODE_CANDIDATES

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-5}
LINEARS = {  # in_features, output slices (bench_sgmv's LLAMA_8B)
    "o": (4096, (4096,)),
    "qkv": (4096, (4096, 1024, 1024)),
    "gate_up": (4096, (14336, 14336)),
    "down": (14336, (4096,)),
}


def _decode_problem(seed, linear, num_tokens, dtype, **options):
    in_features, widths = LINEARS[linear]
    shape = {
        "num_tokens": num_tokens,
        "in_features": in_features,
        "widths": widths,
        "max_rank": 16,
        "num_slots": num_tokens,
        "pattern": "distinct",  # one adapter per token, 20% of them base-only
        "dtype": dtype,
        "rank_choices": (16,),
        "device": "cuda",
    }
    return make_problem(seed, **{**shape, **options})


def _check(p, y):
    assert relative_error(y, expected_y(p, p.y)) < TOLERANCE[p.y.dtype]
    base_only = torch.tensor([s < 0 for s in p.token_slots], device=y.device)
    assert torch.equal(y[base_only], p.y[base_only]), "a base-only token was touched"


def _expand(p, segments, **how):
    y = p.y.clone()
    v = poisoned_v(p)
    torch.cuda.set_sync_debug_mode("error")  # no host-device sync inside the launch
    try:
        sgmv_expand(y, v, p.lora_b, p.ranks, p.scales, p.slice_offsets, segments, **how)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return y


@pytest.mark.parametrize("b_layout", B_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("num_tokens", [1, 16, 64, 256])
@pytest.mark.parametrize("linear", list(LINEARS))
def test_decode_shapes_against_float64(linear, num_tokens, dtype, b_layout):
    seed = num_tokens + list(LINEARS).index(linear)
    p = _decode_problem(seed, linear, num_tokens, dtype, b_layout=b_layout)
    segments = build_segments(p.token_slots, "cuda")
    _check(p, _expand(p, segments, variant="multi_block"))


@pytest.mark.parametrize("b_layout", B_LAYOUTS)
@pytest.mark.parametrize("config", DECODE_CANDIDATES, ids=str)
@pytest.mark.parametrize("linear,num_tokens", [("qkv", 64), ("gate_up", 256)])
def test_every_benchmarked_config(linear, num_tokens, config, b_layout):
    p = _decode_problem(7, linear, num_tokens, torch.bfloat16, b_layout=b_layout)
    segments = build_segments(p.token_slots, "cuda")
    _check(p, _expand(p, segments, config=config))


@pytest.mark.parametrize("b_layout", B_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_mixed_ranks_and_shared_adapters(dtype, b_layout):
    """Ranks 8, 16, 64 and untargeted slices in a rank-64 pool; Zipf popularity, so that tiles
    hold up to 16 tokens of one adapter."""
    p = _decode_problem(
        8,
        "qkv",
        256,
        dtype,
        max_rank=64,
        num_slots=24,
        pattern="zipf",
        rank_choices=(8, 16, 64, 0),
        b_layout=b_layout,
    )
    segments = build_segments(p.token_slots, "cuda", tile_tokens=16)
    _check(p, _expand(p, segments, variant="multi_block"))


@pytest.mark.parametrize("b_layout", B_LAYOUTS)
def test_cuda_graph_replays_batches_unlike_the_captured_one(b_layout):
    """Captured on a one-adapter batch in the engine's decode buffers (16-token tiles), then
    replayed on batches with more adapters and tiles: the grid must not depend on the batch."""
    shapes = {"num_slots": 32, "rank_choices": (8, 16), "b_layout": b_layout}
    p = _decode_problem(9, "qkv", 96, torch.bfloat16, pattern="identical", **shapes)
    buffers = LoraSegmentBuffers.make(96, 32, "cuda", tile_tokens=16)
    segments = buffers.fill(p.token_slots)
    v, y = poisoned_v(p), p.y.clone()

    def expand():
        args = (p.lora_b, p.ranks, p.scales, p.slice_offsets, segments)
        sgmv_expand(y, v, *args, variant="multi_block")

    expand()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        expand()
    for seed, pattern in [(10, "distinct"), (11, "zipf"), (12, "identical")]:
        q = _decode_problem(seed, "qkv", 96, torch.bfloat16, pattern=pattern, **shapes)
        q.lora_a, q.lora_b, q.ranks, q.scales = p.lora_a, p.lora_b, p.ranks, p.scales
        buffers.fill(q.token_slots)
        v.copy_(poisoned_v(q))
        y.copy_(q.y)
        graph.replay()
        torch.cuda.synchronize()
        _check(q, y)
