"""The Triton SGMV kernels on the CPU, in Triton's interpreter, against a float64 definition.

The interpreter must be on before triton decorates anything (it interprets triton.language's own
jitted helpers too), so the cases run in a child pytest with TRITON_INTERPRET=1; the parent
process, where the rest of the suite runs compiled, only starts it. Tiny shapes, fp16 and fp32
(the interpreter computes through numpy, which has no bf16: bf16 is covered on the GPU). The
mixed-rank, multi-slice, wide-rank and fused cases run with B in both layouts (`B_LAYOUTS`).
"""

from __future__ import annotations

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

from interpreter import INTERPRETING, run_in_interpreter
from loraplex.kernels import sgmv
from loraplex.kernels.sgmv import (
    LoraSegmentBuffers,
    build_segments,
    segments_from_slot_tensor,
)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3}
QKV_WIDTHS = (32, 16, 16)  # GQA: q wider than k and v


def test_kernels_in_the_interpreter():
    """Runs this file's cases in a child process with TRITON_INTERPRET=1."""
    run_in_interpreter(__file__)


def interpreted(test):
    """Marks a case for the TRITON_INTERPRET=1 child; the parent deselects it (conftest.py)."""
    test.interpreter_only = True
    return test


def _problem(seed, pattern, dtype, **shape):
    defaults = {
        "num_tokens": 37,
        "in_features": 48,
        "widths": QKV_WIDTHS,
        "max_rank": 8,
        "num_slots": 6,
    }
    return make_problem(seed, pattern=pattern, dtype=dtype, **{**defaults, **shape})


def _run(p, segments, *, shrink_config=None, expand_config=None):
    """Shrink into a NaN-poisoned v, then expand into y; returns (v, y)."""
    from loraplex.kernels.sgmv.expand import sgmv_expand
    from loraplex.kernels.sgmv.shrink import sgmv_shrink

    v = torch.full((p.x.shape[0], p.lora_a.shape[1]), float("nan"))
    sgmv_shrink(p.x, p.lora_a, p.ranks, segments, out=v, config=shrink_config)
    y = p.y.clone()
    sgmv_expand(
        y,
        v,
        p.lora_b,
        p.ranks,
        p.scales,
        p.slice_offsets,
        segments,
        config=expand_config,
    )
    return v, y


def _check(p, v, y):
    tolerance = TOLERANCE[p.x.dtype]
    v_expected, owned = expected_shrink(p)
    assert torch.isfinite(v[owned]).all(), "an owned entry of v was never written"
    assert relative_error(v[owned], v_expected[owned]) < tolerance
    assert relative_error(y, expected_y(p, p.y)) < tolerance
    base_only = torch.tensor([s < 0 for s in p.token_slots], device=y.device)
    assert torch.equal(y[base_only], p.y[base_only]), "a base-only token was touched"


@interpreted
@pytest.mark.parametrize("b_layout", B_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pattern", POPULARITY)
def test_multi_slice_mixed_ranks_every_popularity(pattern, dtype, b_layout):
    p = _problem(POPULARITY.index(pattern), pattern, dtype, b_layout=b_layout)
    segments = build_segments(p.token_slots, tile_tokens=16)
    _check(p, *_run(p, segments))


@interpreted
@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_split_k_and_ragged_k(split_k):
    """K = 40 is not a multiple of BLOCK_K = 16: the last K step is masked."""
    from loraplex.kernels.sgmv.shrink import ShrinkConfig

    p = _problem(10 + split_k, "uniform", torch.float32, in_features=40)
    segments = build_segments(p.token_slots, tile_tokens=16)
    config = ShrinkConfig(block_n=16, block_k=16, split_k=split_k)
    _check(p, *_run(p, segments, shrink_config=config))
    assert not segments.split_counters.any(), "the last split must reset its counter"


@interpreted
@pytest.mark.parametrize("b_layout", B_LAYOUTS)
@pytest.mark.parametrize("max_rank", [8, 16, 24])
def test_rank_wider_than_one_block(max_rank, b_layout):
    """Column blocks that straddle slices (R=8, 24) or hold one slice (R=16); rank steps > 1."""
    from loraplex.kernels.sgmv.expand import ExpandConfig
    from loraplex.kernels.sgmv.shrink import ShrinkConfig

    p = _problem(
        20 + max_rank, "zipf", torch.float32, max_rank=max_rank, b_layout=b_layout
    )
    segments = build_segments(p.token_slots, tile_tokens=32)
    _check(
        p,
        *_run(
            p,
            segments,
            shrink_config=ShrinkConfig(block_n=16, block_k=32, split_k=1),
            expand_config=ExpandConfig(block_n=16, block_r=16),
        ),
    )


@interpreted
@pytest.mark.parametrize("b_layout", B_LAYOUTS)
def test_prefill_tiles_take_ranks_past_32_in_steps(b_layout):
    """Default configs on tiles of 32 tokens in a rank-48 pool: ranks above 32 take two rank
    steps of 32 in the expand (`default_rank_step`), ranks up to 16 the narrow one."""
    p = _problem(
        77, "skewed", torch.float32, max_rank=48, num_tokens=80, b_layout=b_layout
    )
    segments = build_segments(p.token_slots, tile_tokens=32)
    # Slot 0 fills tiles of 32 (> DECODE_BLOCK_M), with slices of rank 12, 7 and 39.
    assert segments.max_tile_len == 32 and p.ranks[0].tolist() == [12, 7, 39]
    _check(p, *_run(p, segments))


def test_rank_step_is_at_most_32_in_prefill_tiles_and_64_in_decode_tiles():
    from loraplex.kernels.sgmv.expand import default_rank_step

    assert [default_rank_step(64, r) for r in (8, 16, 24, 32, 64, 128)] == [
        16, 16, 32, 32, 32, 32,
    ]  # fmt: skip
    assert [default_rank_step(16, r) for r in (8, 16, 24, 64, 128)] == [
        16, 16, 32, 64, 64,
    ]  # fmt: skip


@interpreted
def test_graph_buffers_replayed_with_more_adapters_than_captured():
    """One LoraSegments of fixed capacity, refilled: the second batch has more distinct slots
    and more tiles than the first (the SGLang #28371 bug: a grid baked at capture skipped them);
    the tail tiles of each fill are empty and must exit."""
    buffers = LoraSegmentBuffers.make(
        max_tokens=40, max_slots=6, device="cpu", tile_tokens=16
    )
    for seed, pattern in [(30, "identical"), (31, "distinct"), (32, "skewed")]:
        p = _problem(seed, pattern, torch.float16, num_tokens=40)
        segments = buffers.fill(p.token_slots)
        assert segments.num_tiles == buffers.max_tiles
        _check(p, *_run(p, segments))


@interpreted
def test_batch_of_only_base_tokens_changes_nothing():
    p = _problem(40, "uniform", torch.float32)
    p.token_slots = [-1] * len(p.token_slots)
    for segments in (
        build_segments(p.token_slots),
        LoraSegmentBuffers.make(37, 6, "cpu").fill(p.token_slots),
    ):
        assert not segments.has_lora or segments.num_tiles > 0
        _, y = _run(p, segments)
        assert torch.equal(y, p.y)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pattern", ["uniform", "identical", "skewed"])
def test_add_lora_groups_tokens_on_the_device(pattern, dtype):
    """The functional form: segments built from a slot tensor with torch ops (absent slots are
    empty segments), one slice."""
    p = _problem(50 + POPULARITY.index(pattern), pattern, dtype, widths=(24,))
    p.ranks[0, 0] = 0  # an adapter that targets nothing adds nothing
    y = p.y.clone()
    slots = torch.tensor(p.token_slots, dtype=torch.int32)
    sgmv.add_lora(
        y,
        p.x,
        p.lora_a,
        p.lora_b,
        p.ranks[:, 0].contiguous(),
        p.scales[:, 0].contiguous(),
        slots,
        backend="triton",
    )
    assert relative_error(y, expected_y(p, p.y)) < TOLERANCE[dtype]


@interpreted
@pytest.mark.parametrize("b_layout", B_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pattern", ["distinct", "zipf", "identical"])
@pytest.mark.parametrize("max_rank", [8, 16])
def test_fused_linear_matches_definition(pattern, dtype, max_rank, b_layout):
    """Shrink and expand in one kernel, v in registers; ragged K; slices of rank 0."""
    from loraplex.kernels.sgmv.fused import FusedConfig, sgmv_fused

    shape = {"max_rank": max_rank, "in_features": 40, "b_layout": b_layout}
    p = _problem(100 + max_rank, pattern, dtype, **shape)
    segments = build_segments(p.token_slots, tile_tokens=16)
    y = p.y.clone()
    config = FusedConfig(block_n=16, block_k=16)
    sgmv_fused(
        y,
        p.x,
        p.lora_a,
        p.lora_b,
        p.ranks,
        p.scales,
        p.slice_offsets,
        segments,
        config=config,
    )
    assert relative_error(y, expected_y(p, p.y)) < TOLERANCE[dtype]
    base_only = torch.tensor([s < 0 for s in p.token_slots])
    assert torch.equal(y[base_only], p.y[base_only])


@interpreted
@pytest.mark.parametrize("b_layout", B_LAYOUTS)
@pytest.mark.parametrize("path", ["auto", "fused", "split"])
def test_lora_linear_paths_agree(path, b_layout):
    p = _problem(110, "skewed", torch.float32, b_layout=b_layout)
    segments = LoraSegmentBuffers.make(40, 6, "cpu", tile_tokens=16).fill(p.token_slots)
    y = p.y.clone()
    sgmv.lora_linear(
        y,
        p.x,
        p.lora_a,
        p.lora_b,
        p.ranks,
        p.scales,
        p.slice_offsets,
        segments,
        backend="triton",
        path=path,
    )
    assert relative_error(y, expected_y(p, p.y)) < TOLERANCE[torch.float32]


@interpreted
def test_public_ops_dispatch_to_triton():
    p = _problem(60, "zipf", torch.float16)
    segments = build_segments(p.token_slots)
    y = p.y.clone()
    v = sgmv.lora_shrink(p.x, p.lora_a, p.ranks, segments, backend="triton")
    sgmv.lora_expand(
        y, v, p.lora_b, p.ranks, p.scales, p.slice_offsets, segments, backend="triton"
    )
    assert relative_error(y, expected_y(p, p.y)) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("pattern", POPULARITY)
def test_device_grouping_covers_the_same_tokens(pattern):
    """segments_from_slot_tensor tiles the same (token, slot) pairs as build_segments."""
    gen = torch.Generator().manual_seed(70)
    from sgmv_cases import token_slots_for

    slots = token_slots_for(pattern, 53, 7, gen)

    def pairs(seg):
        out = []
        for start, length, slot in zip(
            seg.tile_starts.tolist(),
            seg.tile_lens.tolist(),
            seg.tile_slots.tolist(),
            strict=True,
        ):
            assert 0 <= length <= seg.tile_tokens
            tokens = seg.sorted_tokens[start : start + length].tolist()
            out += [(t, slot) for t in tokens]
        return sorted(out)

    expected = sorted((t, s) for t, s in enumerate(slots) if s >= 0)
    host = build_segments(slots, tile_tokens=16)
    device = segments_from_slot_tensor(
        torch.tensor(slots, dtype=torch.int32), 7, tile_tokens=16
    )
    filled = LoraSegmentBuffers.make(64, 8, "cpu", tile_tokens=16).fill(slots)
    assert pairs(host) == pairs(device) == pairs(filled) == expected
    assert host.max_tile_len <= 16 and host.num_tiles <= device.num_tiles


def test_launchers_refuse_mismatched_inputs():
    from loraplex.kernels.sgmv.expand import sgmv_expand
    from loraplex.kernels.sgmv.shrink import sgmv_shrink

    p = _problem(80, "uniform", torch.float32)
    segments = build_segments(p.token_slots)
    with pytest.raises(TypeError, match="same float16/32 type"):
        sgmv_shrink(p.x.half(), p.lora_a, p.ranks, segments)
    with pytest.raises(TypeError, match="int32"):
        sgmv_shrink(p.x, p.lora_a, p.ranks.long(), segments)
    with pytest.raises(ValueError, match="shapes disagree"):
        sgmv_shrink(p.x[:, :40], p.lora_a, p.ranks, segments)
    with pytest.raises(ValueError, match="unit stride"):
        sgmv_shrink(p.x.T.contiguous().T, p.lora_a, p.ranks, segments)
    v = torch.zeros(p.x.shape[0], p.lora_a.shape[1])
    with pytest.raises(ValueError, match="slice_offsets"):
        sgmv_expand(p.y, v, p.lora_b, p.ranks, p.scales, (0, 8, 64), segments)
    with pytest.raises(TypeError, match="float32"):
        sgmv_expand(
            p.y, v.half(), p.lora_b, p.ranks, p.scales, p.slice_offsets, segments
        )
    with pytest.raises(ValueError, match="tile_tokens"):
        build_segments([0], tile_tokens=24)


def test_b_without_a_unit_stride_is_refused():
    """B must have unit stride along the rank or along the output; every other layout is
    refused by name before any launch, on the split and the fused path alike."""
    from loraplex.kernels.sgmv.expand import sgmv_expand

    p = _problem(85, "uniform", torch.float32)
    segments = build_segments(p.token_slots)
    v = torch.zeros(p.x.shape[0], p.lora_a.shape[1])
    # Every other rank of a twice-as-wide B: strides (2·out·R, 2R, 2).
    strided = p.lora_b.repeat_interleave(2, dim=2)[:, :, ::2]
    assert torch.equal(strided.nan_to_num(), p.lora_b.nan_to_num())
    args = (p.ranks, p.scales, p.slice_offsets, segments)
    with pytest.raises(ValueError, match="out-major.* or along out_features"):
        sgmv_expand(p.y.clone(), v, strided, *args)
    with pytest.raises(ValueError, match="rank-major"):
        sgmv.lora_linear(
            p.y.clone(), p.x, p.lora_a, strided, *args, backend="triton", path="fused"
        )


@pytest.mark.skipif(INTERPRETING, reason="checks the compiled mode")
def test_cpu_tensors_without_the_interpreter_are_an_error():
    pytest.importorskip("triton")
    p = _problem(90, "uniform", torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        sgmv.lora_shrink(
            p.x, p.lora_a, p.ranks, build_segments(p.token_slots), backend="triton"
        )
