"""v[t, i·R + j] = Σ_k x[t, k] · A[s(t), i·R + j, k]  for every slice i and j < ranks[s(t), i].

SGMV shrink. One program computes one tile of tokens (all of one slot, from `LoraSegments`) times
BLOCK_N columns of v, over one split of the input features. Columns past their slice's rank are
never loaded and a block of columns that holds none exits at once, so a rank-8 adapter in a
rank-64 pool reads and multiplies only its 8 rows.

Decode batches have too few tiles to fill the GPU, so K is split (SPLIT_K > 1): each split stores
its partial sums in a workspace and bumps a per-(tile, column block) counter; the last split to
arrive adds the partials in split order and writes v, then resets the counter to zero for the
next launch. One launch, no zero-filled output, and the same bits on every run. Entries of v that
no valid (token, column) pair owns are left unwritten: the expand never reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import SUPPORTED_DTYPES, dot_precision, kernel_for, next_pow2, num_sms
from ._tiles import load_tile
from .segments import COUNTERS_PER_TILE, LoraSegments


@triton.jit
def sgmv_shrink_kernel(
    x_ptr,
    lora_a_ptr,
    v_ptr,
    partials_ptr,
    split_counters_ptr,
    ranks_ptr,
    sorted_tokens_ptr,
    tile_starts_ptr,
    tile_lens_ptr,
    tile_slots_ptr,
    in_features,
    num_columns,
    max_rank,
    k_per_split,
    stride_x_token,
    stride_a_slot,
    stride_a_row,
    stride_v_token,
    stride_partials_split,
    stride_ranks_slot,
    COUNTERS_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_tile = tl.program_id(1)
    pid_k = tl.program_id(2)
    tile_len, slot, row_valid, tokens = load_tile(
        tile_starts_ptr,
        tile_lens_ptr,
        tile_slots_ptr,
        sorted_tokens_ptr,
        pid_tile,
        BLOCK_M,
    )
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_rank = tl.load(
        ranks_ptr + slot * stride_ranks_slot + offs_n // max_rank,
        mask=offs_n < num_columns,
        other=0,
    )
    col_valid = (offs_n % max_rank) < col_rank
    # An unused tile, or every column of this block past its slice's rank.
    if (tile_len == 0) | (tl.max(col_valid.to(tl.int32), axis=0) == 0):
        return
    x_rows = x_ptr + tokens[:, None] * stride_x_token
    a_rows = lora_a_ptr + slot * stride_a_slot + offs_n[:, None] * stride_a_row

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x_mask = row_valid[:, None]
            a_mask = col_valid[:, None]
        else:
            x_mask = row_valid[:, None] & (offs_k < in_features)[None, :]
            a_mask = col_valid[:, None] & (offs_k < in_features)[None, :]
        x_tile = tl.load(x_rows + offs_k[None, :], mask=x_mask, other=0.0)
        a_tile = tl.load(a_rows + offs_k[None, :], mask=a_mask, other=0.0)
        acc = tl.dot(x_tile, tl.trans(a_tile), acc, input_precision=DOT_PRECISION)

    columns = tokens[:, None] * stride_v_token + offs_n[None, :]
    out_mask = row_valid[:, None] & col_valid[None, :]
    if SPLIT_K == 1:
        tl.store(v_ptr + columns, acc, mask=out_mask)
    else:
        tl.store(
            partials_ptr + pid_k * stride_partials_split + columns, acc, mask=out_mask
        )
        tl.debug_barrier()  # every thread's partial is stored before the release below
        counter = split_counters_ptr + pid_tile * COUNTERS_PER_TILE + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last split: every partial is visible now
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):
                total += tl.load(
                    partials_ptr + split * stride_partials_split + columns,
                    mask=out_mask,
                    other=0.0,
                    cache_modifier=".cg",  # written by other SMs: read from L2
                )
            tl.store(v_ptr + columns, total, mask=out_mask)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@dataclass(frozen=True)
class ShrinkConfig:
    """Tile shape and launch options of one shrink launch (BLOCK_M comes from the segments)."""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


def choose_shrink_config(
    num_tiles: int,
    block_m: int,
    num_columns: int,
    in_features: int,
    dtype: torch.dtype,
    device: torch.device,
) -> ShrinkConfig:
    """A config from the problem shape (memory-bound everywhere: rank <= 128).

    - block_n: decode tiles (block_m 16) take 16 columns per program: more programs, and a
      block past a slot's rank exits, so rank-8 work in a rank-64 pool is a quarter of the
      programs. Prefill tiles take all S·R columns up to 64, so a tile streams x once.
    - block_k: 128 (16-bit) for prefill tiles, 256 for decode tiles so that each program keeps
      more bytes in flight. Halved for fp32.
    - num_stages: as many as fit 96 KB of shared memory (2 to 4), so that two programs share
      an SM.
    - split_k: decode batches have a handful of tiles, each streaming a whole K x rank slab of A;
      K is split until the grid covers every SM twice (prefill: once), down to one K step per
      split (on an H100, T=1: 16 splits ran 4.1 us, 8 splits 4.5 us in a graph).
    """
    decode = block_m <= 16
    block_n = 16 if decode else min(64, max(16, next_pow2(num_columns)))
    elem = torch.finfo(dtype).bits // 8
    block_k = (256 if decode else 128) * 2 // elem
    k_steps = -(-in_features // block_k)
    num_blocks = -(-num_columns // block_n)
    programs = num_blocks * num_tiles
    target = (2 if decode else 1) * num_sms(device)
    split_k = 1
    if num_blocks <= COUNTERS_PER_TILE:
        while programs * split_k < target and 2 * split_k <= k_steps:
            split_k *= 2
    stage_bytes = (block_m + block_n) * block_k * elem
    num_stages = max(2, min(4, 98304 // stage_bytes))
    return ShrinkConfig(block_n, block_k, split_k, num_stages=num_stages)


def check_shrink_inputs(
    x: torch.Tensor, lora_a: torch.Tensor, ranks: torch.Tensor, segments: LoraSegments
) -> None:
    """Raise on shapes, dtypes, strides or devices the shrink does not take."""
    if x.dim() != 2 or lora_a.dim() != 3 or ranks.dim() != 2:
        raise ValueError(
            "expected x [T, in], lora_a [slots, S*R, in], ranks [slots, S]"
        )
    in_features = x.shape[1]
    num_slots, num_columns, a_in = lora_a.shape
    num_slices = ranks.shape[1]
    if a_in != in_features or ranks.shape[0] != num_slots:
        raise ValueError(
            f"shapes disagree: x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}, "
            f"ranks {tuple(ranks.shape)}"
        )
    if num_columns % num_slices:
        raise ValueError(f"lora_a rows {num_columns} are not S={num_slices} x max_rank")
    if x.dtype not in SUPPORTED_DTYPES or lora_a.dtype != x.dtype:
        raise TypeError(f"x {x.dtype} and lora_a {lora_a.dtype}: same float16/32 type")
    if ranks.dtype != torch.int32:
        raise TypeError(f"ranks must be int32, got {ranks.dtype}")
    if x.stride(1) != 1 or lora_a.stride(2) != 1 or ranks.stride(1) != 1:
        raise ValueError("x, lora_a and ranks need unit stride along their last dim")
    if not (x.device == lora_a.device == ranks.device == segments.tile_lens.device):
        raise ValueError("x, lora_a, ranks and the segments must share one device")


def sgmv_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    ranks: torch.Tensor,
    segments: LoraSegments,
    *,
    out: torch.Tensor | None = None,
    config: ShrinkConfig | None = None,
) -> torch.Tensor:
    """Launch the shrink: returns v [num_tokens, S·R] float32 (see the module docstring).

    :param x: [num_tokens, in_features] bf16/fp16/fp32, unit stride along features.
    :param lora_a: [num_slots, S·R, in_features], same dtype, unit stride along features.
    :param ranks: [num_slots, S] int32 on the same device.
    :param out: optional [num_tokens, S·R] float32 to write into (tests poison it).
    :param config: overrides `choose_shrink_config` (benchmarks sweep it).
    """
    check_shrink_inputs(x, lora_a, ranks, segments)
    num_tokens, in_features = x.shape
    num_columns = lora_a.shape[1]
    num_slices = ranks.shape[1]
    if out is None:
        out = torch.empty(num_tokens, num_columns, dtype=torch.float32, device=x.device)
    elif out.shape != (num_tokens, num_columns) or out.dtype != torch.float32:
        raise ValueError(f"out must be [{num_tokens}, {num_columns}] float32")
    elif not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if segments.num_tiles == 0:
        return out

    block_m = max(16, next_pow2(segments.max_tile_len))
    cfg = config or choose_shrink_config(
        segments.num_tiles, block_m, num_columns, in_features, x.dtype, x.device
    )
    num_blocks = -(-num_columns // cfg.block_n)
    if cfg.split_k > 1 and num_blocks > COUNTERS_PER_TILE:
        raise ValueError(f"split_k needs at most {COUNTERS_PER_TILE} column blocks")
    partials = out
    if cfg.split_k > 1:
        partials = torch.empty(
            cfg.split_k, num_tokens, num_columns, dtype=torch.float32, device=x.device
        )
    k_steps = -(-in_features // cfg.block_k)
    k_per_split = -(-k_steps // cfg.split_k) * cfg.block_k
    grid = (num_blocks, segments.num_tiles, cfg.split_k)
    kernel_for(sgmv_shrink_kernel, x)[grid](
        x,
        lora_a,
        out,
        partials,
        segments.split_counters,
        ranks,
        segments.sorted_tokens,
        segments.tile_starts,
        segments.tile_lens,
        segments.tile_slots,
        in_features,
        num_columns,
        num_columns // num_slices,
        k_per_split,
        x.stride(0),
        lora_a.stride(0),
        lora_a.stride(1),
        out.stride(0),
        partials.stride(0) if cfg.split_k > 1 else 0,
        ranks.stride(0),
        COUNTERS_PER_TILE=COUNTERS_PER_TILE,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k,
        EVEN_K=in_features % cfg.block_k == 0,
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
