"""y[t, o_i + n] += scales[s, i] · Σ_{j < ranks[s, i]} v[t, i·R + j] · B[s, o_i + n, j], s = s(t).

SGMV expand, all output slices of one fused linear (q/k/v of different widths under GQA,
gate/up) in one launch. The output blocks of the slices are laid back to back along grid axis 0,
so a narrow k/v slice launches only its own blocks; axis 1 is the tile of tokens. Each program
reads B only up to its slot's own rank for its slice: one step of 16 ranks for ranks up to 16,
steps of up to 64 beyond (32 in prefill tiles: `default_rank_step`); a slice of rank 0 exits. v (float32) is
rounded to the activation dtype for the tensor-core product, which accumulates in float32.

B comes in either layout of `layout.py`: out-major (unit stride along the rank) or rank-major
(unit stride along the output, the slot pool's: a rank-r adapter's r rows are read whole and
coalesced, nothing past them). Its strides are plain int arguments, so Triton specializes the
unit one to a constant and each layout gets its own compiled kernel with contiguous loads.

Two variants for decode tiles (up to 16 tokens): "per_block", the kernel below, and
"multi_block" (`expand_blocks.py`: several output blocks per program, the next block's loads in
flight during this block's product). `DECODE_EXPAND_VARIANT` says which one `sgmv_expand` runs
for decode tiles by itself; tiles of more rows (prefill) always take the per-block kernel.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

from ._launch import SUPPORTED_DTYPES, dot_precision, kernel_for, next_pow2
from ._tiles import load_tile, output_block
from .expand_blocks import (
    ExpandBlocksConfig,
    choose_expand_blocks_config,
    launch_expand_blocks,
)
from .segments import LoraSegments

ExpandVariant = Literal["per_block", "multi_block"]
# The decode expand `sgmv_expand` runs when neither a config nor a variant is given. On an H200
# (2026-11-27, bench_sgmv --only expand_variants) the multi-block kernel took 0.53-0.88x the
# per-block kernel's time on every decode shape (T = 1..256; o, qkv, gate_up, down), identical
# outputs: benchmarks/results/bench_sgmv-h200-2026-11-27-expand-variants.json.
DECODE_EXPAND_VARIANT: ExpandVariant = "multi_block"
# Tiles of at most this many rows (BLOCK_M) are decode tiles.
DECODE_BLOCK_M = 16


@triton.jit
def _rank_step(
    v_rows, b_cols, stride_b_rank, r, rank, row_valid, col_valid, STEP: tl.constexpr,
    DOT_PRECISION,
):  # fmt: skip
    """v[:, r : r + STEP] · B[n, r : r + STEP]ᵀ over the ranks below `rank`, in float32."""
    offs_r = r + tl.arange(0, STEP)
    r_valid = offs_r < rank
    v_tile = tl.load(
        v_rows + offs_r[None, :], mask=row_valid[:, None] & r_valid[None, :], other=0.0
    )
    b_tile = tl.load(
        b_cols + offs_r[:, None] * stride_b_rank,
        mask=r_valid[:, None] & col_valid[None, :],
        other=0.0,
    )
    return tl.dot(v_tile.to(b_tile.dtype), b_tile, input_precision=DOT_PRECISION)


@triton.jit
def sgmv_expand_kernel(
    y_ptr,
    v_ptr,
    lora_b_ptr,
    ranks_ptr,
    scales_ptr,
    sorted_tokens_ptr,
    tile_starts_ptr,
    tile_lens_ptr,
    tile_slots_ptr,
    slice_offsets,
    slice_first_blocks,
    max_rank,
    stride_y_token,
    stride_v_token,
    stride_b_slot,
    stride_b_row,
    stride_b_rank,
    stride_ranks_slot,
    stride_scales_slot,
    NUM_SLICES: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SMALL_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_tile = tl.program_id(1)
    tile_len, slot, row_valid, tokens = load_tile(
        tile_starts_ptr,
        tile_lens_ptr,
        tile_slots_ptr,
        sorted_tokens_ptr,
        pid_tile,
        BLOCK_M,
    )
    slice_id, offs_n, col_valid = output_block(
        pid_n, slice_offsets, slice_first_blocks, NUM_SLICES, BLOCK_N, ALIGNED
    )
    rank = tl.load(ranks_ptr + slot * stride_ranks_slot + slice_id)
    scale = tl.load(scales_ptr + slot * stride_scales_slot + slice_id)
    # An unused tile, or an adapter that leaves this slice alone.
    if (tile_len == 0) | (rank == 0):
        return
    v_rows = v_ptr + tokens[:, None] * stride_v_token + slice_id * max_rank
    b_cols = lora_b_ptr + slot * stride_b_slot + offs_n[None, :] * stride_b_row

    if rank <= SMALL_R:
        # Ranks up to 16 take one narrow step, whatever the pool's max_rank: a rank-8 adapter
        # in a rank-64 pool pays for 16 ranks, not 64.
        acc = _rank_step(
            v_rows, b_cols, stride_b_rank, 0, rank, row_valid, col_valid, SMALL_R,
            DOT_PRECISION,
        )  # fmt: skip
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r in range(0, rank, BLOCK_R):
            acc += _rank_step(
                v_rows, b_cols, stride_b_rank, r, rank, row_valid, col_valid, BLOCK_R,
                DOT_PRECISION,
            )  # fmt: skip

    y_ptrs = y_ptr + tokens[:, None] * stride_y_token + offs_n[None, :]
    y_mask = row_valid[:, None] & col_valid[None, :]
    y_old = tl.load(y_ptrs, mask=y_mask, other=0.0)
    y_new = y_old.to(tl.float32) + acc * scale
    tl.store(y_ptrs, y_new.to(y_ptr.dtype.element_ty), mask=y_mask)


@dataclass(frozen=True)
class ExpandConfig:
    """Tile shape and launch options of one expand launch (BLOCK_M comes from the segments)."""

    block_n: int
    # Rank step past rank 16; None: `default_rank_step`.
    block_r: int | None = None
    num_warps: int = 4
    # One stage: the rank loop is 1-2 steps, and pipelined Hopper wgmma with a register operand
    # (v rounded in registers) was miscompiled by ptxas < 13.3 (triton-lang/triton#9433).
    num_stages: int = 1


def default_rank_step(block_m: int, max_rank: int) -> int:
    """The pool's max_rank rounded up to a power of two in [16, 64] for decode tiles, so that
    ranks up to 64 take one step (one round of loads), and at most 32 for prefill tiles.

    Every program is compiled for the widest step, so in a rank-64 pool a 64-wide step sets the
    registers, and the occupancy, of the rank-8 tiles too. On an H100 (2026-11-28,
    benchmarks/sgmv_rank_step_probe.py, q/k/v T=8192 in runs of 512) steps of 32 against 64
    took 88.0 against 115.0 µs with ranks 8/16/64 mixed and 99.0 against 120.6 µs at rank 64.
    """
    widest = 32 if block_m > DECODE_BLOCK_M else 64
    return min(widest, max(16, next_pow2(max_rank)))


def choose_expand_config(block_m: int, dtype: torch.dtype) -> ExpandConfig:
    """A config from the problem shape. Expand streams y (read + write) and each slot's B once.

    128 columns of 16-bit y per gathered token row (256 contiguous bytes), 4 warps: the best of
    the configs swept on an H100 (2026-11-27) for decode (T=256, gate/up) and prefill (T=8192,
    q/k/v and gate/up), ahead of 64 columns or 8 warps by 10-20%. fp32 y: half the columns.
    """
    block_n = 64 if dtype == torch.float32 else 128
    return ExpandConfig(block_n=block_n)


def check_expand_inputs(
    y: torch.Tensor,
    v: torch.Tensor | None,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    slice_offsets: Sequence[int],
    segments: LoraSegments,
) -> None:
    """Raise on shapes, dtypes, strides or devices the expand does not take (v None: fused)."""
    if y.dim() != 2 or lora_b.dim() != 3 or (v is not None and v.dim() != 2):
        raise ValueError("expected y [T, out], v [T, S*R], lora_b [slots, out, R]")
    num_tokens, out_features = y.shape
    num_slots, b_out, max_rank = lora_b.shape
    num_slices = ranks.shape[1] if ranks.dim() == 2 else -1
    offsets = tuple(int(o) for o in slice_offsets)
    if (
        ranks.shape != (num_slots, num_slices)
        or scales.shape != (num_slots, num_slices)
        or (v is not None and v.shape != (num_tokens, num_slices * max_rank))
        or b_out != out_features
    ):
        raise ValueError(
            f"shapes disagree: y {tuple(y.shape)}, lora_b "
            f"{tuple(lora_b.shape)}, ranks {tuple(ranks.shape)}, scales {tuple(scales.shape)}"
        )
    if len(offsets) != num_slices + 1 or offsets[0] != 0 or offsets[-1] != out_features:
        raise ValueError(f"slice_offsets {offsets} must run from 0 to {out_features}")
    if any(b < a for a, b in itertools.pairwise(offsets)):
        raise ValueError(f"slice_offsets {offsets} must not decrease")
    if y.dtype not in SUPPORTED_DTYPES or lora_b.dtype != y.dtype:
        raise TypeError(f"y {y.dtype} and lora_b {lora_b.dtype}: same float16/32 type")
    if scales.dtype != torch.float32 or (v is not None and v.dtype != torch.float32):
        raise TypeError("v and scales must be float32")
    if ranks.dtype != torch.int32:
        raise TypeError(f"ranks must be int32, got {ranks.dtype}")
    if y.stride(1) != 1 or (v is not None and v.stride(1) != 1):
        raise ValueError("y and v need unit stride along their last dim")
    if lora_b.stride(2) != 1 and lora_b.stride(1) != 1:
        raise ValueError(
            f"lora_b {tuple(lora_b.shape)} has strides {lora_b.stride()}: it needs unit "
            "stride along the rank (out-major, contiguous [slots, out, R]) or along "
            "out_features (rank-major, a transpose(1, 2) view of contiguous [slots, R, out], "
            "as sgmv.new_lora_b makes)"
        )
    if ranks.stride(1) != 1 or scales.stride(1) != 1:
        raise ValueError("ranks and scales need unit stride along slices")
    tensors = (y, lora_b, ranks, scales, segments.tile_lens) + (
        () if v is None else (v,)
    )
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError("all tensors and the segments must share one device")


def sgmv_expand(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    slice_offsets: Sequence[int],
    segments: LoraSegments,
    *,
    config: ExpandConfig | ExpandBlocksConfig | None = None,
    variant: ExpandVariant | None = None,
) -> None:
    """Launch the expand: y += the LoRA delta of every slice, in place (module docstring).

    :param y: [num_tokens, out_features] bf16/fp16/fp32, unit stride along features.
    :param v: [num_tokens, S·R] float32 from the shrink, unit stride along columns.
    :param lora_b: [num_slots, out_features, R], y's dtype, unit stride along the rank
        (out-major) or along out_features (rank-major, the slot pool's: a low-rank adapter
        then reads only its own rows; `layout.py`).
    :param ranks: [num_slots, S] int32; scales: [num_slots, S] float32.
    :param slice_offsets: S + 1 host ints: where each slice starts, then out_features.
    :param config: overrides the chosen config; its type picks the kernel (benchmarks sweep it).
    :param variant: the kernel without a config; None: `DECODE_EXPAND_VARIANT` for decode
        tiles, "per_block" otherwise.
    """
    check_expand_inputs(y, v, lora_b, ranks, scales, slice_offsets, segments)
    offsets = tuple(int(o) for o in slice_offsets)
    if segments.num_tiles == 0:
        return
    block_m = max(16, next_pow2(segments.max_tile_len))
    cfg = config or expand_config_for(y, offsets, segments, variant)
    if isinstance(cfg, ExpandBlocksConfig):
        launch_expand_blocks(
            y, v, lora_b, ranks, scales, offsets, segments, block_m, cfg
        )
    else:
        _launch_per_block(y, v, lora_b, ranks, scales, offsets, segments, block_m, cfg)


def expand_config_for(
    y: torch.Tensor,
    slice_offsets: Sequence[int],
    segments: LoraSegments,
    variant: ExpandVariant | None = None,
) -> ExpandConfig | ExpandBlocksConfig:
    """The config (and with its type the kernel) `sgmv_expand` picks without one given."""
    block_m = max(16, next_pow2(segments.max_tile_len))
    if variant is None:
        variant = DECODE_EXPAND_VARIANT if block_m <= DECODE_BLOCK_M else "per_block"
    if variant == "per_block":
        return choose_expand_config(block_m, y.dtype)
    if variant != "multi_block":
        raise ValueError(f"unknown expand variant {variant!r}")
    widths = tuple(end - start for start, end in itertools.pairwise(slice_offsets))
    return choose_expand_blocks_config(widths, segments.num_tiles, y.dtype, y.device)


def _launch_per_block(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    offsets: tuple[int, ...],
    segments: LoraSegments,
    block_m: int,
    cfg: ExpandConfig,
) -> None:
    max_rank = lora_b.shape[2]
    num_slices = ranks.shape[1]
    first_blocks = [0]
    for start, end in itertools.pairwise(offsets):
        first_blocks.append(first_blocks[-1] + -(-(end - start) // cfg.block_n))
    if first_blocks[-1] == 0:
        return
    grid = (first_blocks[-1], segments.num_tiles)
    kernel_for(sgmv_expand_kernel, y)[grid](
        y,
        v,
        lora_b,
        ranks,
        scales,
        segments.sorted_tokens,
        segments.tile_starts,
        segments.tile_lens,
        segments.tile_slots,
        offsets,
        tuple(first_blocks),
        max_rank,
        y.stride(0),
        v.stride(0),
        lora_b.stride(0),
        lora_b.stride(1),
        lora_b.stride(2),
        ranks.stride(0),
        scales.stride(0),
        NUM_SLICES=num_slices,
        ALIGNED=all(o % 16 == 0 for o in offsets),
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_R=cfg.block_r or default_rank_step(block_m, max_rank),
        SMALL_R=16,
        DOT_PRECISION=dot_precision(y.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
