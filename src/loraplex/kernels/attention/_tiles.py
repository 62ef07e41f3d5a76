"""Device helpers the attention kernels share: paged K/V tile addresses and one softmax step."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def kv_offsets(
    block_table_row,
    positions,
    in_range,
    stride_block,
    stride_slot,
    BLOCK_SIZE: tl.constexpr,
):
    """Element offsets (int64: a layer's cache can pass 2**31 elements) of `positions`' cache
    rows, read through one sequence's row of the block table.

    Positions not `in_range` read no block id and get offset 0; their loads must be masked.
    """
    block_ids = tl.load(
        block_table_row + positions // BLOCK_SIZE, mask=in_range, other=0
    )
    return (
        block_ids.to(tl.int64) * stride_block + (positions % BLOCK_SIZE) * stride_slot
    )


@triton.jit
def softmax_step(
    s,
    v,
    acc,
    m,
    denom,
    DOT_PRECISION: tl.constexpr,
    MAY_BE_EMPTY: tl.constexpr,
):
    """One online-softmax step over a tile of base-2 scores s [M, N] and values v [N, D].

    acc [M, D] float32 holds Σ 2^(s - m) · v and denom [M] Σ 2^(s - m) for the running row
    maximum m [M]. MAY_BE_EMPTY: some row of s may be all -inf (masked); its maximum is then
    taken as 0 so that 2^(-inf - 0) = 0 instead of 2^(-inf + inf) = NaN.
    """
    m_new = tl.maximum(m, tl.max(s, 1))
    if MAY_BE_EMPTY:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    alpha = tl.math.exp2(m - m_ref)
    p = tl.math.exp2(s - m_ref[:, None])
    denom = denom * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, denom
