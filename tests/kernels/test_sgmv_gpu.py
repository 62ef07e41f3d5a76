"""The Triton SGMV kernels on a CUDA GPU against a float64 definition (pytest -m gpu).

The full grid dtype x hidden x rank x tokens x popularity has thousands of points; the cases
below walk it so that every hidden size meets every rank, and dtypes, token counts, popularity
patterns and linear shapes (o, q/k/v under GQA, gate/up) rotate across them, and so does B's
layout (out-major, or rank-major as the slot pool holds it); mixed ranks run in both. Every case
draws fresh random inputs, poisons v with NaN and checks the base-only rows bit for bit.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from sgmv_cases import (
    B_LAYOUTS,
    POPULARITY,
    expected_shrink,
    expected_y,
    make_problem,
    relative_error,
)

from loraplex.kernels import sgmv
from loraplex.kernels.sgmv import LoraSegmentBuffers, build_segments
from loraplex.kernels.sgmv.expand import sgmv_expand
from loraplex.kernels.sgmv.shrink import sgmv_shrink

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}
HIDDEN = (2048, 4096, 5120, 8192)
RANKS = (8, 16, 32, 64, 128, "mixed")
TOKENS = (1, 7, 64, 300, 1024, 8192)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _widths(kind: str, hidden: int) -> tuple[int, ...]:
    return {
        "o": (hidden,),
        "qkv": (hidden, hidden // 4, hidden // 4),  # GQA, 4 query heads per KV head
        "gate_up": (2 * hidden, 2 * hidden),
    }[kind]


def _grid():
    """Every hidden size meets every rank; with h the hidden's index and r the rank's, the dtype
    turns with r + h, the linear with r + 2h, the token count with r + h and B's layout with h,
    so that each rank meets several of each (mixed ranks: both layouts)."""
    kinds = ("qkv", "o", "gate_up")
    cases = []
    for n, (hidden, rank) in enumerate(itertools.product(HIDDEN, RANKS)):
        h, r = divmod(n, len(RANKS))
        case = (
            n,
            DTYPES[(r + h) % 3],
            hidden,
            rank,
            TOKENS[(r + h) % len(TOKENS)],
            POPULARITY[n % 5],
            kinds[(r + 2 * h) % 3],
        )
        layouts = B_LAYOUTS if rank == "mixed" else (B_LAYOUTS[h % 2],)
        cases += [(*case, layout) for layout in layouts]
    # bf16 (the serving dtype) with mixed ranks over long segments, and 8B-sized gate/up.
    for layout in B_LAYOUTS:
        cases.append((24, torch.bfloat16, 4096, "mixed", 8192, "zipf", "qkv", layout))
    cases.append(
        (25, torch.bfloat16, 4096, 16, 4096, "skewed", "gate_up", "rank_major")
    )
    return cases


def _check(p, v, y, y_before):
    tolerance = TOLERANCE[p.x.dtype]
    v_expected, owned = expected_shrink(p)
    assert torch.isfinite(v[owned]).all(), "an owned entry of v was never written"
    if owned.any():  # a batch of base-only tokens owns nothing
        assert relative_error(v[owned], v_expected[owned]) < tolerance
    assert relative_error(y, expected_y(p, y_before)) < tolerance
    base_only = torch.tensor([s < 0 for s in p.token_slots], device=y.device)
    assert torch.equal(y[base_only], y_before[base_only])


@pytest.mark.parametrize(
    "seed,dtype,hidden,rank,num_tokens,pattern,kind,b_layout",
    _grid(),
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_against_float64(
    seed, dtype, hidden, rank, num_tokens, pattern, kind, b_layout
):
    max_rank = 64 if rank == "mixed" else rank
    p = make_problem(
        seed,
        num_tokens=num_tokens,
        in_features=hidden,
        widths=_widths(kind, hidden),
        max_rank=max_rank,
        num_slots=24,
        pattern=pattern,
        dtype=dtype,
        rank_choices=(8, 16, 64, 0) if rank == "mixed" else (rank,),
        device="cuda",
        b_layout=b_layout,
    )
    segments = build_segments(p.token_slots, "cuda")
    poisoned_v = torch.full((num_tokens, p.lora_a.shape[1]), float("nan"))
    v = poisoned_v.to("cuda")

    y = p.y.clone()
    torch.cuda.set_sync_debug_mode("error")  # no host-device sync inside the ops
    try:
        sgmv_shrink(p.x, p.lora_a, p.ranks, segments, out=v)
        sgmv_expand(y, v, p.lora_b, p.ranks, p.scales, p.slice_offsets, segments)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _check(p, v, y, p.y)

    if num_tokens <= 1024:  # the fused kernel (shrink + expand in one launch)
        y = p.y.clone()
        args = (p.lora_b, p.ranks, p.scales, p.slice_offsets, segments)
        sgmv.lora_linear(y, p.x, p.lora_a, *args, path="fused")
        assert relative_error(y, expected_y(p, p.y)) < TOLERANCE[dtype]


@pytest.mark.parametrize("b_layout", B_LAYOUTS)
def test_cuda_graph_replays_batches_unlike_the_captured_one(b_layout):
    """Captured on a one-adapter batch, replayed on batches with more adapters and tiles (the
    SGLang #28371 bug: a grid baked at capture silently skipped segments)."""
    num_tokens, hidden = 96, 4096
    shapes = {
        "num_tokens": num_tokens,
        "in_features": hidden,
        "widths": _widths("qkv", hidden),
        "max_rank": 16,
        "num_slots": 32,
        "dtype": torch.bfloat16,
        "rank_choices": (8, 16),
        "device": "cuda",
        "b_layout": b_layout,
    }
    p = make_problem(1, pattern="identical", **shapes)
    buffers = LoraSegmentBuffers.make(num_tokens, 32, "cuda")
    segments = buffers.fill(p.token_slots)
    x, y = p.x.clone(), p.y.clone()

    def step():  # the split path, then the fused one: both must follow the new batches
        v = sgmv.lora_shrink(x, p.lora_a, p.ranks, segments)
        sgmv.lora_expand(y, v, p.lora_b, p.ranks, p.scales, p.slice_offsets, segments)
        args = (p.lora_b, p.ranks, p.scales, p.slice_offsets, segments)
        sgmv.lora_linear(y, x, p.lora_a, *args, path="fused")

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed, pattern in [(2, "distinct"), (3, "zipf"), (4, "identical")]:
        q = make_problem(seed, pattern=pattern, **shapes)
        q.lora_a, q.lora_b, q.ranks, q.scales = p.lora_a, p.lora_b, p.ranks, p.scales
        assert buffers.fill(q.token_slots) is not None
        x.copy_(q.x)
        y.copy_(q.y)
        graph.replay()
        torch.cuda.synchronize()
        twice = expected_y(q, expected_y(q, q.y))  # the delta is added twice per step
        assert relative_error(y, twice) < TOLERANCE[torch.bfloat16]
        assert not segments.split_counters.any()


@pytest.mark.parametrize("b_layout", B_LAYOUTS)
@pytest.mark.parametrize("pattern", POPULARITY)
def test_add_lora_groups_on_the_device_without_sync(pattern, b_layout):
    p = make_problem(
        5,
        num_tokens=200,
        in_features=2048,
        widths=(2048,),
        max_rank=32,
        num_slots=16,
        pattern=pattern,
        dtype=torch.bfloat16,
        rank_choices=(0, 8, 32),
        device="cuda",
        b_layout=b_layout,
    )
    slots = torch.tensor(p.token_slots, dtype=torch.int32, device="cuda")
    y = p.y.clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sgmv.add_lora(
            y,
            p.x,
            p.lora_a,
            p.lora_b,
            p.ranks[:, 0].contiguous(),
            p.scales[:, 0].contiguous(),
            slots,
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert relative_error(y, expected_y(p, p.y)) < TOLERANCE[torch.bfloat16]


def test_auto_backend_runs_triton_on_cuda():
    assert sgmv.resolve_backend("auto", torch.zeros(1, device="cuda")) == "triton"
