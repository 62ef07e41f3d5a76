"""y[t, o_i + n] += scales[s, i] · (x[t] · A[s, i·R : i·R + r]ᵀ) · B[s, o_i + n, :r]ᵀ, s = s(t), r = ranks[s, i].

Shrink and expand in one launch, for decode batches. Each program owns one tile of tokens and
one block of output columns; it computes the shrink of its own slice (x of the tile against
the slot's r rows of A, all of K) in registers and applies it to its block of B and y at once,
so v never touches memory and a LoRA linear costs one graph node instead of two. The price:
every output block of a tile recomputes the shrink, reading the slot's A again from L2, and each
program streams all of K alone. Measured on an H100 (2026-11-27, benchmarks/bench_sgmv.py) that
price was higher than the second launch on every decode shape (one token: 10.9-29.6 us against
7.6-9.0 us for the split pair), so `lora_linear` runs it only when asked (path="fused").
B comes out-major or rank-major (the slot pool's, `layout.py`), its strides passed as they are.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import dot_precision, kernel_for, next_pow2
from ._tiles import load_tile, output_block
from .segments import LoraSegments


@triton.jit
def sgmv_fused_kernel(
    y_ptr,
    x_ptr,
    lora_a_ptr,
    lora_b_ptr,
    ranks_ptr,
    scales_ptr,
    sorted_tokens_ptr,
    tile_starts_ptr,
    tile_lens_ptr,
    tile_slots_ptr,
    slice_offsets,
    slice_first_blocks,
    in_features,
    max_rank,
    stride_y_token,
    stride_x_token,
    stride_a_slot,
    stride_a_row,
    stride_b_slot,
    stride_b_row,
    stride_b_rank,
    stride_ranks_slot,
    stride_scales_slot,
    NUM_SLICES: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EVEN_K: tl.constexpr,
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
    if (tile_len == 0) | (rank == 0):
        return

    # Shrink of this slice: v[BLOCK_M, BLOCK_R] = x_tile · A[slot, slice rows < rank]ᵀ.
    offs_r = tl.arange(0, BLOCK_R)
    r_valid = offs_r < rank
    x_rows = x_ptr + tokens[:, None] * stride_x_token
    a_rows = (
        lora_a_ptr
        + slot * stride_a_slot
        + (slice_id * max_rank + offs_r)[:, None] * stride_a_row
    )
    v = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, in_features, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x_mask = row_valid[:, None]
            a_mask = r_valid[:, None]
        else:
            x_mask = row_valid[:, None] & (offs_k < in_features)[None, :]
            a_mask = r_valid[:, None] & (offs_k < in_features)[None, :]
        x_tile = tl.load(x_rows + offs_k[None, :], mask=x_mask, other=0.0)
        a_tile = tl.load(a_rows + offs_k[None, :], mask=a_mask, other=0.0)
        v = tl.dot(x_tile, tl.trans(a_tile), v, input_precision=DOT_PRECISION)

    # Expand of this block: y += scale · v · B[slot, offs_n, :rank]ᵀ.
    b_tile = tl.load(
        lora_b_ptr
        + slot * stride_b_slot
        + offs_n[None, :] * stride_b_row
        + offs_r[:, None] * stride_b_rank,
        mask=r_valid[:, None] & col_valid[None, :],
        other=0.0,
    )
    delta = tl.dot(v.to(b_tile.dtype), b_tile, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + tokens[:, None] * stride_y_token + offs_n[None, :]
    y_mask = row_valid[:, None] & col_valid[None, :]
    y_old = tl.load(y_ptrs, mask=y_mask, other=0.0)
    y_new = y_old.to(tl.float32) + delta * scale
    tl.store(y_ptrs, y_new.to(y_ptr.dtype.element_ty), mask=y_mask)


@dataclass(frozen=True)
class FusedConfig:
    """Tile shape and launch options of one fused launch (BLOCK_M comes from the segments)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def choose_fused_config(max_rank: int, block_m: int, dtype: torch.dtype) -> FusedConfig:
    """Wide output blocks (256 16-bit columns, 128 past rank 64 to bound the B tile) so that
    fewer programs re-read A; K steps of 256 keep each program's A stream several loads deep.
    Tiles of 64 tokens (graph buffers) take 8 warps and K steps of 128: with 4 warps the
    accumulators spill (sm_90 compile report)."""
    elem = torch.finfo(dtype).bits // 8
    block_n = (512 if max_rank <= 64 else 256) // elem
    block_k = (512 if max_rank <= 32 else 256) // elem
    if block_m >= 64:
        return FusedConfig(block_n=block_n, block_k=block_k // 2, num_warps=8)
    return FusedConfig(block_n=block_n, block_k=block_k)


def sgmv_fused(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    slice_offsets: Sequence[int],
    segments: LoraSegments,
    *,
    config: FusedConfig | None = None,
) -> None:
    """Launch the fused kernel (module docstring). Shapes, dtypes and strides are those of
    `sgmv_shrink` and `sgmv_expand`, which the caller has checked (`lora_linear`): `lora_b`
    out-major or rank-major (`layout.py`), its strides passed as they are."""
    if segments.num_tiles == 0:
        return
    offsets = tuple(int(o) for o in slice_offsets)
    max_rank = lora_b.shape[2]
    block_m = max(16, next_pow2(segments.max_tile_len))
    cfg = config or choose_fused_config(max_rank, block_m, x.dtype)
    first_blocks = [0]
    for start, end in itertools.pairwise(offsets):
        first_blocks.append(first_blocks[-1] + -(-(end - start) // cfg.block_n))
    if first_blocks[-1] == 0:
        return
    in_features = x.shape[1]
    kernel_for(sgmv_fused_kernel, y)[(first_blocks[-1], segments.num_tiles)](
        y,
        x,
        lora_a,
        lora_b,
        ranks,
        scales,
        segments.sorted_tokens,
        segments.tile_starts,
        segments.tile_lens,
        segments.tile_slots,
        offsets,
        tuple(first_blocks),
        in_features,
        max_rank,
        y.stride(0),
        x.stride(0),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        lora_b.stride(2),
        ranks.stride(0),
        scales.stride(0),
        NUM_SLICES=len(offsets) - 1,
        ALIGNED=all(o % 16 == 0 for o in offsets),
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        BLOCK_R=max(16, next_pow2(max_rank)),
        EVEN_K=in_features % cfg.block_k == 0,
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
