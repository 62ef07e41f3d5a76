"""out[s, h] = Σ_j softmax_j(q[s, h] · K[s, j] · scale) · V[s, j] over j in the window < seq_len[s].

Paged decode attention: every sequence whose query length is 1 (a decode, or a prefill chunk of
one token) attends with its one query token over its whole cached context. One program takes
one (sequence, KV head) pair and all GROUP query heads of that KV head as the rows of one tile,
so each K/V tile is read once for the group; it walks the context BLOCK_N positions (several
cache blocks) at a time. Sequences of any other query length are left to the prefill kernel.

Split-K (flash-decoding): when sequences x KV heads are too few to fill the GPU, each program
takes one of num_splits equal, tile-aligned slices of its sequence's context and stores its
normalised partial output and log-sum-exp; a second launch (`combine_splits_kernel`) merges the
slices. The split count depends only on host ints (batch size, heads, max_seq_len), so one
CUDA graph replays for any seq_lens: each program finds its slice from its own seq_len.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import dot_precision, kernel_for, next_pow2, num_sms
from ._tiles import kv_offsets, softmax_step

MAX_SPLITS = 64


# Ints that change from step to step are not specialised (== 1, multiple of 16), so that
# a new batch never waits for a recompile.
@triton.jit(do_not_specialize=["stride_table_seq"])
def paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,
    sliding_window,
    stride_q_token,
    stride_q_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_table_seq,
    stride_out_token,
    stride_out_head,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # The split count is a runtime value: one compiled kernel serves every count.
    num_splits = tl.num_programs(2)
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    if q_len != 1:  # no query token, or a prefill chunk: not this kernel's row
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    if USE_WINDOW:
        start = tl.maximum(seq_len - sliding_window, 0)
    else:
        start = 0
    # Tiles are BLOCK_N-aligned positions, so that a tile is whole cache blocks.
    first = (start // BLOCK_N) * BLOCK_N
    if not SPLIT:
        lo = first
        hi = seq_len
    else:
        per_split = tl.cdiv(tl.cdiv(seq_len - first, num_splits), BLOCK_N) * BLOCK_N
        lo = first + split * per_split
        hi = tl.minimum(lo + per_split, seq_len)

    rows = tl.arange(
        0, BLOCK_H
    )  # rows past GROUP pad the tile to the MMA's minimum of 16
    heads = kv_head * GROUP + rows
    row_ok = rows < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM  # head_dim need not be a power of two: the tile is padded
    q = tl.load(
        q_ptr
        + q_begin.to(tl.int64) * stride_q_token
        + heads[:, None] * stride_q_head
        + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    k_base = k_cache_ptr + kv_head * stride_cache_head + dims[None, :]
    v_base = v_cache_ptr + kv_head * stride_cache_head + dims[None, :]
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    denom = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for tile in range(lo, hi, BLOCK_N):
        positions = tile + tl.arange(0, BLOCK_N)
        in_range = (positions >= start) & (positions < hi)
        offsets = kv_offsets(
            table_row,
            positions,
            in_range,
            stride_cache_block,
            stride_cache_slot,
            BLOCK_SIZE,
        )
        kv_mask = in_range[:, None] & dim_ok[None, :]
        k = tl.load(k_base + offsets[:, None], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offsets[:, None], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(in_range[None, :], s, float("-inf"))
        acc, m, denom = softmax_step(s, v, acc, m, denom, DOT_PRECISION, True)

    # denom is 0 only where nothing was seen (seq_len 0, an empty split): acc is 0 there too.
    safe_denom = tl.where(denom > 0, denom, 1.0)
    out_mask = row_ok[:, None] & dim_ok[None, :]
    if not SPLIT:
        tl.store(
            out_ptr
            + q_begin.to(tl.int64) * stride_out_token
            + heads[:, None] * stride_out_head
            + dims[None, :],
            (acc / safe_denom[:, None]).to(out_ptr.dtype.element_ty),
            mask=out_mask,
        )
    else:
        part = (seq * (tl.num_programs(1) * GROUP) + heads) * num_splits + split
        tl.store(
            part_out_ptr + part.to(tl.int64)[:, None] * HEAD_DIM + dims[None, :],
            acc / safe_denom[:, None],
            mask=out_mask,
        )
        lse = tl.where(denom > 0, m + tl.math.log2(safe_denom), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_splits"])
def combine_splits_kernel(
    part_out_ptr,
    part_lse_ptr,
    query_start_loc_ptr,
    out_ptr,
    num_splits,
    stride_out_token,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
):
    """out[s, h] = Σ_i 2^(lse_i - L) · o_i / Σ_i 2^(lse_i - L), L = max_i lse_i, per row."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    if q_len != 1:  # the decode kernel wrote no partials for this sequence
        return
    splits = tl.arange(0, BLOCK_SPLITS)
    split_ok = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    part = (seq * tl.num_programs(1) + head) * num_splits + splits
    lse = tl.load(part_lse_ptr + part, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # every split empty: weights all 0
    weights = tl.math.exp2(lse - top)
    parts = tl.load(
        part_out_ptr + part.to(tl.int64)[:, None] * HEAD_DIM + dims[None, :],
        mask=split_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    total = tl.sum(weights, 0)
    out = tl.sum(weights[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr
        + q_begin.to(tl.int64) * stride_out_token
        + head * stride_out_head
        + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dim_ok,
    )


@dataclass(frozen=True)
class DecodeConfig:
    """Tile and launch options of one decode launch."""

    block_n: int
    num_splits: int
    num_warps: int = 4
    num_stages: int = 3


def choose_decode_config(
    num_seqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> DecodeConfig:
    """A config from host ints only (CUDA graphs replay it for any seq_lens).

    - block_n: a K tile of about 16 KB (64 positions at head_dim 128 in 16 bits, 4 blocks of
      16), so that with V and 3 stages ~96 KB are in flight per program: decode is a stream
      of the cache, and bandwidth needs bytes in flight. 16 in the interpreter (tiny tests
      then cross tiles and blocks).
    - num_splits: 1 when sequences x KV heads cover every SM once (B >= 17 at 8 KV heads on
      an H100); below that, enough splits to put two programs on every SM, but never slices
      shorter than one tile of max_seq_len (B=1 at 8 KV heads: 33 splits on 132 SMs).
    """
    block_d = max(16, next_pow2(head_dim))
    elem = torch.finfo(dtype).bits // 8
    if device.type == "cuda":
        block_n = max(16, min(128, 16384 // (block_d * elem)))
    else:
        block_n = 16
    programs = max(1, num_seqs * num_kv_heads)
    sms = num_sms(device)
    num_splits = 1
    if programs < sms:
        num_splits = min(
            math.ceil(2 * sms / programs),
            math.ceil(max(1, max_seq_len) / block_n),
            MAX_SPLITS,
        )
    return DecodeConfig(block_n=block_n, num_splits=num_splits)


def launch_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    config: DecodeConfig,
) -> None:
    """Write out's rows of every sequence of query length 1 (inputs checked by the caller)."""
    num_seqs = seq_lens.shape[0]
    num_heads, head_dim = query.shape[1:]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    splits = config.num_splits
    if splits > 1:
        part_out = torch.empty(
            num_seqs,
            num_heads,
            splits,
            head_dim,
            dtype=torch.float32,
            device=out.device,
        )
        part_lse = torch.empty(
            num_seqs, num_heads, splits, dtype=torch.float32, device=out.device
        )
    else:  # unused: the kernel stores straight into out
        part_out = part_lse = out
    block_d = max(16, next_pow2(head_dim))
    kernel_for(paged_decode_kernel, query)[(num_seqs, num_kv_heads, splits)](
        query,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        out,
        part_out,
        part_lse,
        scale * math.log2(math.e),
        sliding_window or 0,
        query.stride(0),
        query.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_H=max(16, next_pow2(group)),
        BLOCK_D=block_d,
        BLOCK_N=config.block_n,
        SPLIT=splits > 1,
        USE_WINDOW=sliding_window is not None,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if splits > 1:
        kernel_for(combine_splits_kernel, query)[(num_seqs, num_heads)](
            part_out,
            part_lse,
            query_start_loc,
            out,
            splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_SPLITS=next_pow2(splits),
            num_warps=4,
        )
