"""The multi-block decode expand on the CPU, in Triton's interpreter, against float64.

Like test_sgmv_triton.py: the cases run in a child pytest with TRITON_INTERPRET=1, on tiny
shapes, fp32 and fp16. v comes from the float64 definition of the shrink, rounded to float32,
with every entry no (token, column within rank) pair owns poisoned with NaN; B is NaN past each
slot's rank (sgmv_cases.make_problem); y is a view into wider rows whose padding is NaN. Every
case draws fresh random inputs. The mixed-rank, rank-loop and base-only cases run with B in both
layouts (`B_LAYOUTS`): rank-major B is read exactly to the rank, out-major B to the rank rounded
up to 8.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from sgmv_cases import B_LAYOUTS, POPULARITY, expected_y, make_problem, poisoned_v
from sgmv_cases import relative_error as rel

from interpreter import run_in_interpreter
from loraplex.kernels.sgmv import (
    LoraSegmentBuffers,
    build_segments,
    segments_from_slot_tensor,
)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3}
# q wider than k and v, ragged against 16-column blocks; or all slices on 16-column bounds.
RAGGED = (72, 24, 40)
ALIGNED = (64, 16, 32)


def test_multi_block_expand_in_the_interpreter():
    """Runs this file's cases in a child process with TRITON_INTERPRET=1."""
    run_in_interpreter(__file__)


def interpreted(test):
    test.interpreter_only = True  # deselected in the parent (conftest.py)
    return test


def _problem(seed, pattern, dtype, **shape):
    defaults = {
        "num_tokens": 29,
        "in_features": 24,
        "widths": RAGGED,
        "max_rank": 8,
        "num_slots": 6,
    }
    return make_problem(seed, pattern=pattern, dtype=dtype, **{**defaults, **shape})


def _expand(p, segments, config=None, variant="multi_block"):
    """y (a view into NaN-padded rows) after the expand, and the padding."""
    from loraplex.kernels.sgmv.expand import sgmv_expand

    out = p.y.shape[1]
    rows = torch.full((p.y.shape[0], out + 16), float("nan"), dtype=p.y.dtype)
    y = rows[:, :out]
    y.copy_(p.y)
    sgmv_expand(
        y,
        poisoned_v(p),
        p.lora_b,
        p.ranks,
        p.scales,
        p.slice_offsets,
        segments,
        config=config,
        variant=variant,
    )
    return y, rows[:, out:]


def _check(p, y, padding):
    assert rel(y, expected_y(p, p.y)) < TOLERANCE[p.y.dtype]
    assert padding.isnan().all(), "a column past out_features was written"
    # What the definition leaves alone stays bit for bit: base-only tokens, rank-0 slices.
    ranks = p.ranks.tolist()
    for t, slot in enumerate(p.token_slots):
        for i, (lo, hi) in enumerate(itertools.pairwise(p.slice_offsets)):
            if slot < 0 or ranks[slot][i] == 0:
                assert torch.equal(y[t, lo:hi], p.y[t, lo:hi]), (t, slot, i)


def _config(block_n=16, blocks=2, **options):
    from loraplex.kernels.sgmv.expand_blocks import ExpandBlocksConfig

    return ExpandBlocksConfig(block_n=block_n, blocks_per_program=blocks, **options)


@interpreted
@pytest.mark.parametrize(
    "max_rank,b_layout", [(12, "out_major"), (16, "out_major"), (16, "rank_major")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pattern", POPULARITY)
def test_every_popularity_multi_slice_mixed_ranks(pattern, dtype, max_rank, b_layout):
    """Decode tiles (up to 16 tokens), ranks 0..max_rank per slot and slice, slot -1 tokens.
    max_rank 16: v, and out-major B, are read to the rank rounded up to 8 and zeroed past the
    rank (NaN there); max_rank 12, or rank-major B: read only to the rank (rank-major B in a
    pool whose max_rank is no multiple of 8: test_ranks_past_the_first_rank_step, R = 20)."""
    seed = 200 + POPULARITY.index(pattern) + max_rank
    p = _problem(seed, pattern, dtype, max_rank=max_rank, b_layout=b_layout)
    segments = build_segments(p.token_slots, tile_tokens=16)
    _check(p, *_expand(p, segments, _config(blocks=2)))


@interpreted
@pytest.mark.parametrize(
    "options",
    [
        {"blocks": 1},
        {"blocks": 3},  # groups end inside a slice, and past its last block
        {"blocks": 8},  # one group per slice
        {"block_n": 32, "blocks": 2, "prefetch": False},
        {"blocks": 2, "prefetch": False, "num_stages": 2},
        {"blocks": 4, "num_warps": 2},
    ],
    ids=str,
)
@pytest.mark.parametrize("widths", [RAGGED, ALIGNED], ids=["ragged", "aligned"])
def test_blocks_per_program_and_schedules(options, widths):
    p = _problem(210 + len(str(options)), "zipf", torch.float32, widths=widths)
    segments = build_segments(p.token_slots, tile_tokens=16)
    _check(p, *_expand(p, segments, _config(**options)))


@interpreted
@pytest.mark.parametrize("b_layout", B_LAYOUTS)
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("max_rank", [20, 24, 40])
def test_ranks_past_the_first_rank_step(max_rank, prefetch, b_layout):
    """Ranks 0..max_rank in 16-wide steps: one narrow step up to 16, then the first BLOCK_R
    step and the further ones only up to each slot's rank."""
    shape = {"max_rank": max_rank, "b_layout": b_layout}
    p = _problem(220 + max_rank, "uniform", torch.float32, **shape)
    segments = build_segments(p.token_slots, tile_tokens=16)
    config = _config(blocks=3, prefetch=prefetch, block_r=16)
    _check(p, *_expand(p, segments, config))


@interpreted
@pytest.mark.parametrize("b_layout", B_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_ranks_one_wide_step(dtype, b_layout):
    """Ranks 8, 16 and 64 in a pool of max_rank 64 (one BLOCK_R = 64 step past rank 16)."""
    shape = {"max_rank": 64, "rank_choices": (8, 16, 64, 0), "b_layout": b_layout}
    p = _problem(230, "distinct", dtype, **shape)
    segments = build_segments(p.token_slots, tile_tokens=16)
    _check(p, *_expand(p, segments, _config(blocks=2)))


@interpreted
def test_graph_buffers_refilled_with_more_adapters_than_first():
    """Fixed-capacity segments, refilled: tail tiles of length 0 exit, whatever the batch."""
    buffers = LoraSegmentBuffers.make(
        max_tokens=32, max_slots=6, device="cpu", tile_tokens=16
    )
    for seed, pattern in [(240, "identical"), (241, "distinct"), (242, "skewed")]:
        p = _problem(seed, pattern, torch.float16, num_tokens=32)
        segments = buffers.fill(p.token_slots)
        _check(p, *_expand(p, segments, _config(blocks=2)))


@interpreted
@pytest.mark.parametrize("pattern", ["zipf", "identical"])
def test_empty_segments_from_a_slot_tensor(pattern):
    """Every slot gets a segment (absent ones empty), the grid sized by capacity."""
    p = _problem(250 + POPULARITY.index(pattern), pattern, torch.float32, num_slots=7)
    slots = torch.tensor(p.token_slots, dtype=torch.int32)
    segments = segments_from_slot_tensor(slots, 7, tile_tokens=16)
    _check(p, *_expand(p, segments, _config(blocks=2)))


@interpreted
@pytest.mark.parametrize("b_layout", B_LAYOUTS)
def test_tiles_wider_than_decode_and_only_base_tokens(b_layout):
    """32-token tiles (BLOCK_M 32) hold one adapter's run; then a batch of base-only tokens."""
    p = _problem(260, "skewed", torch.float16, num_tokens=40, b_layout=b_layout)
    _check(p, *_expand(p, build_segments(p.token_slots, tile_tokens=32), _config()))
    p.token_slots = [-1] * len(p.token_slots)
    y, padding = _expand(p, build_segments(p.token_slots), _config())
    assert torch.equal(y, p.y) and padding.isnan().all()


@interpreted
@pytest.mark.parametrize("variant", ["multi_block", "per_block", None])
def test_variant_without_a_config(variant):
    """The launcher's own config for each variant; None is DECODE_EXPAND_VARIANT."""
    p = _problem(270, "uniform", torch.float16, widths=ALIGNED)
    _check(p, *_expand(p, build_segments(p.token_slots), variant=variant))


def test_decode_default_is_multi_block_and_configs_depend_on_host_ints():
    from loraplex.kernels.sgmv import expand
    from loraplex.kernels.sgmv.expand_blocks import ExpandBlocksConfig

    p = _problem(280, "distinct", torch.float16)
    decode = build_segments(p.token_slots, tile_tokens=16)
    prefill = build_segments([0] * 64, tile_tokens=64)
    assert expand.DECODE_EXPAND_VARIANT == "multi_block"
    assert isinstance(
        expand.expand_config_for(p.y, p.slice_offsets, decode), ExpandBlocksConfig
    )
    assert isinstance(
        expand.expand_config_for(p.y, p.slice_offsets, decode, "per_block"),
        expand.ExpandConfig,
    )
    chosen = expand.expand_config_for(p.y, p.slice_offsets, decode, "multi_block")
    assert isinstance(chosen, ExpandBlocksConfig) and chosen.block_n == 128
    # Few tiles and few blocks (4 "SMs" for CPU tensors): one block per program.
    assert chosen.blocks_per_program == 1
    wide = expand.expand_config_for(p.y, (0, 8192, 16384), decode, "multi_block")
    assert wide.blocks_per_program == 8
    fp32 = expand.expand_config_for(p.y.float(), p.slice_offsets, decode, "multi_block")
    assert fp32.block_n == 64
    assert isinstance(
        expand.expand_config_for(p.y, p.slice_offsets, prefill), expand.ExpandConfig
    )
    with pytest.raises(ValueError, match="variant"):
        expand.expand_config_for(p.y, p.slice_offsets, decode, "fused")


def test_launcher_refuses_stages_with_prefetch_or_wide_tiles():
    from loraplex.kernels.sgmv.expand import sgmv_expand

    p = _problem(290, "identical", torch.float32, num_tokens=64)
    v = torch.zeros(p.y.shape[0], p.lora_b.shape[2] * 3)
    args = (p.y, v, p.lora_b, p.ranks, p.scales, p.slice_offsets)
    decode = build_segments(p.token_slots, tile_tokens=16)
    wide = build_segments(p.token_slots, tile_tokens=64)
    assert wide.max_tile_len > 32
    bad = [
        (decode, _config(num_stages=2)),  # prefetch on
        (wide, _config(prefetch=False, num_stages=2)),  # 64-row tiles: wgmma
        (decode, _config(block_n=24)),
        (decode, _config(blocks=0)),
    ]
    for segments, config in bad:
        with pytest.raises(ValueError):
            sgmv_expand(*args, segments, config=config)
