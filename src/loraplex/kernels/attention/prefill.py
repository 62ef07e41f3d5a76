"""out[t, h] = Σ_j softmax_j(q[t, h] · K[s, j] · scale) · V[s, j] over j ≤ pos(t) in the window.

Paged prefill attention (flash attention over a paged cache): every sequence whose query length
is above 1 (a prompt, or a chunk of one after earlier chunks that are already cached) attends
with its query tokens, BLOCK_M at a time, over its cached context and causally over itself.
One program takes one (query tile, query head); its KV head is head // GROUP.

The grid needs no host sync: sequence i owns tile slots [c(i), c(i+1)) with
c(i) = query_start_loc[i] // BLOCK_M + i, which always holds its ceil(q_len / BLOCK_M) tiles, so
num_tokens // BLOCK_M + num_seqs slots cover any batch and a program finds its sequence by a
binary search over c. Slots past a sequence's tiles, and sequences of query length 0 or 1 (the
decode kernel's), exit at once. A sequence's last (longest) tile takes its first slot, so that
the heaviest programs start first.

Key tiles a program visits are only those some row of its tile can see (causal end, window
start); tiles every row sees whole run without masks, the diagonal and window edges with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import dot_precision, kernel_for, next_pow2
from ._tiles import kv_offsets, softmax_step


@triton.jit
def _attend_tiles(
    acc,
    m,
    denom,
    q,
    q_positions,
    k_base,
    v_base,
    table_row,
    lo,
    hi,
    kv_end,
    start,
    dim_ok,
    scale_log2,
    stride_cache_block,
    stride_cache_slot,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Key tiles [lo, hi) step BLOCK_N; MASKED applies the causal, window and length masks."""
    for tile in range(lo, hi, BLOCK_N):
        positions = tile + tl.arange(0, BLOCK_N)
        if MASKED:
            in_range = positions < kv_end
        else:  # the caller proved every position of these tiles is < kv_end
            in_range = positions >= 0
        offsets = kv_offsets(
            table_row,
            positions,
            in_range,
            stride_cache_block,
            stride_cache_slot,
            BLOCK_SIZE,
        )
        if MASKED:
            kv_mask = in_range[:, None] & dim_ok[None, :]
            k = tl.load(k_base + offsets[:, None], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offsets[:, None], mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_base + offsets[:, None])
            v = tl.load(v_base + offsets[:, None])
        else:
            k = tl.load(k_base + offsets[:, None], mask=dim_ok[None, :], other=0.0)
            v = tl.load(v_base + offsets[:, None], mask=dim_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        if MASKED:
            visible = (positions[None, :] <= q_positions[:, None]) & in_range[None, :]
            if USE_WINDOW:
                visible &= positions[None, :] >= start[:, None]
            s = tl.where(visible, s, float("-inf"))
        acc, m, denom = softmax_step(s, v, acc, m, denom, DOT_PRECISION, MASKED)
    return acc, m, denom


# Ints that change from step to step are not specialised (== 1, multiple of 16), so that
# a new batch never waits for a recompile.
@triton.jit(do_not_specialize=["num_seqs", "stride_table_seq"])
def paged_prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    out_ptr,
    num_seqs,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    head = tl.program_id(0)
    slot = tl.program_id(1)
    # The last sequence i with c(i) = query_start_loc[i] // BLOCK_M + i <= slot.
    lo = slot * 0  # a tensor (not a constexpr) from the start: it is loop-carried
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        owns = tl.load(query_start_loc_ptr + mid) // BLOCK_M + mid <= slot
        lo = tl.where(owns, mid, lo)
        hi = tl.where(owns, hi, mid - 1)
    seq = lo
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    num_tiles = tl.cdiv(q_len, BLOCK_M)
    local = slot - (q_begin // BLOCK_M + seq)
    if (q_len <= 1) | (local >= num_tiles):
        return
    tile = num_tiles - 1 - local
    seq_len = tl.load(seq_lens_ptr + seq)

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q_positions = seq_len - q_len + rows  # negative only in a padding sequence
    first_pos = seq_len - q_len + tile * BLOCK_M
    last_pos = seq_len - q_len + tl.minimum((tile + 1) * BLOCK_M, q_len) - 1
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr
        + (q_begin + rows).to(tl.int64)[:, None] * stride_q_token
        + head * stride_q_head
        + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    kv_head = head // GROUP
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    k_base = k_cache_ptr + kv_head * stride_cache_head + dims[None, :]
    v_base = v_cache_ptr + kv_head * stride_cache_head + dims[None, :]

    # Key positions some row sees: [kv_start, kv_end). Tiles [a, b) and [c, kv_end) need masks
    # (window edge, causal diagonal); [b, c) is seen whole by every row.
    kv_end = tl.maximum(last_pos + 1, 0)
    if USE_WINDOW:
        start = q_positions - sliding_window + 1  # per row
        a = (tl.maximum(first_pos - sliding_window + 1, 0) // BLOCK_N) * BLOCK_N
        b = tl.cdiv(tl.maximum(last_pos - sliding_window + 1, 0), BLOCK_N) * BLOCK_N
        b = tl.maximum(a, b)
    else:
        start = q_positions  # unused without a window
        a = 0
        b = 0
    c = tl.maximum(b, (tl.maximum(first_pos + 1, 0) // BLOCK_N) * BLOCK_N)

    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    denom = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if USE_WINDOW:
        acc, m, denom = _attend_tiles(
            acc,
            m,
            denom,
            q,
            q_positions,
            k_base,
            v_base,
            table_row,
            a,
            tl.minimum(b, kv_end),
            kv_end,
            start,
            dim_ok,
            scale_log2,
            stride_cache_block,
            stride_cache_slot,
            BLOCK_SIZE,
            BLOCK_N,
            True,
            USE_WINDOW,
            BLOCK_D == HEAD_DIM,
            DOT_PRECISION,
        )
    acc, m, denom = _attend_tiles(
        acc,
        m,
        denom,
        q,
        q_positions,
        k_base,
        v_base,
        table_row,
        b,
        c,
        kv_end,
        start,
        dim_ok,
        scale_log2,
        stride_cache_block,
        stride_cache_slot,
        BLOCK_SIZE,
        BLOCK_N,
        False,
        USE_WINDOW,
        BLOCK_D == HEAD_DIM,
        DOT_PRECISION,
    )
    acc, m, denom = _attend_tiles(
        acc,
        m,
        denom,
        q,
        q_positions,
        k_base,
        v_base,
        table_row,
        c,
        kv_end,
        kv_end,
        start,
        dim_ok,
        scale_log2,
        stride_cache_block,
        stride_cache_slot,
        BLOCK_SIZE,
        BLOCK_N,
        True,
        USE_WINDOW,
        BLOCK_D == HEAD_DIM,
        DOT_PRECISION,
    )
    # denom is 0 only for a row that sees nothing (a padding sequence): its output is 0.
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(
        out_ptr
        + (q_begin + rows).to(tl.int64)[:, None] * stride_out_token
        + head * stride_out_head
        + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )


@dataclass(frozen=True)
class PrefillConfig:
    """Tile and launch options of one prefill launch."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def choose_prefill_config(
    head_dim: int, dtype: torch.dtype, device: torch.device
) -> PrefillConfig:
    """A config from the head size and dtype (prefill is compute-bound: big tiles).

    16-bit heads up to 128: 128 x 64 tiles, 8 warps, 3 K/V stages (~96 KB of shared memory;
    wgmma on Hopper). fp32 (tests and parity runs, not serving): 32 x 32, 4 warps, which
    compiled for sm_90 with the least register spill. Wider heads halve the 16-bit tiles.
    16 x 16 in the interpreter, so that tiny tests cross tiles.
    """
    if device.type != "cuda":
        return PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return PrefillConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
    if next_pow2(head_dim) > 128:
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)


def launch_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    config: PrefillConfig,
) -> None:
    """Write out's rows of every sequence of query length > 1 (inputs checked by the caller)."""
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    grid = (num_heads, num_tokens // config.block_m + num_seqs)
    kernel_for(paged_prefill_kernel, query)[grid](
        query,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        out,
        num_seqs,
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
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_D=max(16, next_pow2(head_dim)),
        USE_WINDOW=sliding_window is not None,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
