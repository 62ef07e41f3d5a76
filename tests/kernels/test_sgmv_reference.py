"""The SGMV torch reference against a float64 per-token loop, over adapter-popularity patterns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sgmv_cases import POPULARITY, token_slots_for

from loraplex.kernels import sgmv
from loraplex.kernels.sgmv import LoraSegmentBuffers, build_segments
from loraplex.kernels.sgmv.segments import _group, _group_on_host


def naive_add_lora(y, x, lora_a, lora_b, ranks, scales, token_slots):
    """The definition, token by token, in float64."""
    out = y.double().clone()
    for t, s in enumerate(token_slots.tolist()):
        if s < 0:
            continue
        r = int(ranks[s])
        a, b = lora_a[s, :r].double(), lora_b[s, :, :r].double()
        out[t] += float(scales[s]) * (x[t].double() @ a.T) @ b.T
    return out


def random_problem(gen, num_tokens, num_slots, max_rank, d_in, d_out, pattern, dtype):
    x = torch.randn(num_tokens, d_in, generator=gen).to(dtype)
    y = torch.randn(num_tokens, d_out, generator=gen).to(dtype)
    lora_a = torch.randn(num_slots, max_rank, d_in, generator=gen).to(dtype)
    lora_b = torch.randn(num_slots, d_out, max_rank, generator=gen).to(dtype)
    ranks = torch.randint(
        1, max_rank + 1, (num_slots,), generator=gen, dtype=torch.int32
    )
    ranks[0] = 0 if num_slots > 2 else ranks[0]  # an empty slot must add nothing
    scales = torch.rand(num_slots, generator=gen) + 0.5
    slots = torch.tensor(
        token_slots_for(pattern, num_tokens, num_slots, gen), dtype=torch.int32
    )
    return y, x, lora_a, lora_b, ranks, scales, slots


@pytest.mark.parametrize("pattern", POPULARITY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_lora_reference_matches_definition(pattern, dtype):
    gen = torch.Generator().manual_seed(hash(pattern) % 1000)
    y, x, a, b, ranks, scales, slots = random_problem(
        gen, 37, 5, 16, 24, 40, pattern, dtype
    )
    expected = naive_add_lora(y, x, a, b, ranks, scales, slots)
    sgmv.add_lora(y, x, a, b, ranks, scales, slots, backend="torch")
    err = (y.double() - expected).norm() / expected.norm()
    assert err < 1e-6


def test_base_only_tokens_are_untouched():
    gen = torch.Generator().manual_seed(1)
    y, x, a, b, ranks, scales, _ = random_problem(
        gen, 9, 3, 4, 8, 8, "uniform", torch.float32
    )
    slots = torch.tensor([-1, 0, -1, 1, 2, -1, 2, 1, -1], dtype=torch.int32)
    ranks[:] = 4
    before = y.clone()
    sgmv.add_lora(y, x, a, b, ranks, scales, slots, backend="torch")
    base_rows = slots < 0
    assert torch.equal(y[base_rows], before[base_rows])
    assert not torch.allclose(y[~base_rows], before[~base_rows])


def test_only_each_slots_own_rank_is_read():
    gen = torch.Generator().manual_seed(2)
    y, x, a, b, ranks, scales, slots = random_problem(
        gen, 16, 4, 8, 12, 12, "uniform", torch.float32
    )
    ranks = torch.tensor([2, 3, 8, 5], dtype=torch.int32)
    expected = y.clone()
    sgmv.add_lora(expected, x, a, b, ranks, scales, slots, backend="torch")
    for s, r in enumerate(ranks.tolist()):  # garbage past each rank must not matter
        a[s, r:] = float("nan")
        b[s, :, r:] = float("nan")
    sgmv.add_lora(y, x, a, b, ranks, scales, slots, backend="torch")
    assert torch.equal(y, expected)


@pytest.mark.parametrize("pattern", POPULARITY)
def test_fused_shrink_expand_equals_add_lora_per_slice(pattern):
    """q/k/v-style: three slices of different widths (GQA) and per-slice ranks, one shrink."""
    gen = torch.Generator().manual_seed(3)
    num_tokens, num_slots, max_rank, d_in = 29, 6, 8, 20
    widths = (16, 8, 8)
    offsets = (0, 16, 24, 32)
    x = torch.randn(num_tokens, d_in, generator=gen)
    y = torch.randn(num_tokens, sum(widths), generator=gen)
    lora_a = torch.randn(num_slots, 3 * max_rank, d_in, generator=gen)
    lora_b = torch.randn(num_slots, sum(widths), max_rank, generator=gen)
    ranks = torch.randint(
        0, max_rank + 1, (num_slots, 3), generator=gen, dtype=torch.int32
    )
    scales = torch.rand(num_slots, 3, generator=gen)
    slots = token_slots_for(pattern, num_tokens, num_slots, gen)
    segments = build_segments(slots)

    expected = y.clone()
    for i in range(3):
        sgmv.add_lora(
            expected[:, offsets[i] : offsets[i + 1]],
            x,
            lora_a[:, i * max_rank : (i + 1) * max_rank],
            lora_b[:, offsets[i] : offsets[i + 1]],
            ranks[:, i].contiguous(),
            scales[:, i].contiguous(),
            segments.token_slots,
            backend="torch",
        )
    v = sgmv.lora_shrink(x, lora_a, ranks, segments, backend="torch")
    assert v.dtype == torch.float32 and v.shape == (num_tokens, 3 * max_rank)
    sgmv.lora_expand(y, v, lora_b, ranks, scales, offsets, segments, backend="torch")
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_build_segments_groups_tokens_by_slot():
    slots = [2, -1, 0, 2, 2, 0, -1, 5]
    seg = build_segments(slots)
    assert seg.token_slots.tolist() == slots
    assert seg.segment_slots.tolist() == [0, 2, 5]
    assert seg.segment_starts.tolist() == [0, 2, 5, 6]
    assert seg.sorted_tokens.tolist() == [2, 5, 0, 3, 4, 7]
    assert seg.num_segments == 3 and seg.num_lora_tokens == 6 and seg.has_lora
    assert not build_segments([-1, -1]).has_lora


def test_unknown_backend_is_refused():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="unknown SGMV backend"):
        sgmv.resolve_backend("cuda", x)
    assert sgmv.resolve_backend("auto", x) == "torch"


@pytest.mark.parametrize("pattern", POPULARITY)
@pytest.mark.parametrize("num_tokens", [0, 1, 17, 300])
def test_numpy_grouping_equals_its_python_spec(pattern, num_tokens):
    """The grouping every step builds (numpy) against the plain loop that defines it, and what
    `LoraSegmentBuffers.fill` writes after it: padded tails, unused tiles of length 0."""
    gen = torch.Generator().manual_seed(num_tokens * 7 + len(pattern))
    slots = token_slots_for(pattern, num_tokens, 6, gen) if num_tokens else []
    for tile_tokens in (16, 64):
        got = _group(np.asarray(slots, dtype=np.int64), tile_tokens)
        tokens, starts, seg_slots, tiles = _group_on_host(slots, tile_tokens)
        assert got.sorted_tokens.tolist() == tokens
        assert got.segment_starts.tolist() == starts
        assert got.segment_slots.tolist() == seg_slots
        columns = [list(c) for c in zip(*tiles, strict=True)] or [[], [], []]
        assert got.tile_starts.tolist() == columns[0]
        assert got.tile_lens.tolist() == columns[1]
        assert got.tile_slots.tolist() == columns[2]
        buffers = LoraSegmentBuffers.make(320, 6, "cpu", tile_tokens=tile_tokens)
        buffers.fill([5] * 320)  # stale contents, for the next fill to overwrite
        seg = buffers.fill(slots)
        assert seg.token_slots.tolist() == slots
        used = len(tiles)
        assert seg.tile_lens[:used].tolist() == columns[1]
        assert not seg.tile_lens[used:].any() and not seg.tile_slots[used:].any()
        assert seg.segment_starts[len(starts) :].eq(starts[-1]).all()
