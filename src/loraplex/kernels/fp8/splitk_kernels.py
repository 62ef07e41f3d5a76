"""The Triton kernels of splitk.py (its docstring is their design); each program computes
y[m, n] = s_w[n] · Σ_{k in its split} x[m, k] · q_w[n, k] (+ b[n]) for one [BLOCK_M, BLOCK_N]
tile, then joins the other splits of the tile (`_finish`)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _k_mask(k, k_end, offs_k, EVEN_K: tl.constexpr):
    """(offsets, mask) of the K chunk at k: nothing at or past k_end. EVEN_K (k_end a multiple
    of BLOCK_K): one scalar per chunk, so that the 16-byte loads stay whole."""
    kk = k + offs_k
    if EVEN_K:
        k_mask = k < k_end
    else:
        k_mask = kk < k_end
    return kk, k_mask


@triton.jit
def _x_row(x_ptr, kk, k_mask, num_tokens, stride_x_token, x0, m: tl.constexpr,
           BLOCK_M: tl.constexpr):  # fmt: skip
    """x[m, kk] [BLOCK_K]; zeros for a token past num_tokens; x0 itself (unread) past BLOCK_M."""
    x = x0
    if m < BLOCK_M:
        x = tl.load(
            x_ptr + m * stride_x_token + kk, mask=k_mask & (m < num_tokens), other=0.0
        )
    return x


@triton.jit
def _fma_chunk(x_ptr, w_rows, kk, k_mask, n_valid, num_tokens, stride_x_token,
               BLOCK_M: tl.constexpr, EVEN_K: tl.constexpr):  # fmt: skip
    """(w [BLOCK_N, BLOCK_K] fp8, x of tokens 0..3 [BLOCK_K] each) of one K chunk."""
    if EVEN_K:
        w_mask = n_valid[:, None] & k_mask
    else:
        w_mask = n_valid[:, None] & k_mask[None, :]
    w = tl.load(w_rows + kk[None, :], mask=w_mask, other=0.0)
    x0 = tl.load(x_ptr + kk, mask=k_mask, other=0.0)
    x1 = _x_row(x_ptr, kk, k_mask, num_tokens, stride_x_token, x0, 1, BLOCK_M)
    x2 = _x_row(x_ptr, kk, k_mask, num_tokens, stride_x_token, x0, 2, BLOCK_M)
    x3 = _x_row(x_ptr, kk, k_mask, num_tokens, stride_x_token, x0, 3, BLOCK_M)
    return w, x0, x1, x2, x3


@triton.jit
def _fma(acc, w, x, m: tl.constexpr, BLOCK_M: tl.constexpr):
    """acc [BLOCK_N, BLOCK_K] += w · x[None, :] elementwise, in w's own layout (token m)."""
    if m < BLOCK_M:
        acc += w * x.to(tl.float32)[None, :]
    return acc


@triton.jit
def _place(tile, acc, offs_m, m: tl.constexpr, BLOCK_M: tl.constexpr):
    """tile [BLOCK_M, BLOCK_N] with row m = Σ_k acc [BLOCK_N, BLOCK_K]."""
    if m < BLOCK_M:
        tile = tl.where(offs_m[:, None] == m, tl.sum(acc, axis=1)[None, :], tile)
    return tile


@triton.jit
def _write_y(acc, y_ptr, w_scales_ptr, bias_ptr, offs_m, offs_n, out_mask, n_valid,
             stride_y_token, HAS_BIAS: tl.constexpr):  # fmt: skip
    """y [BLOCK_M, BLOCK_N] = acc · s_w (+ b), in y's dtype."""
    y = acc * tl.load(w_scales_ptr + offs_n, mask=n_valid, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    rows = y_ptr + offs_m.to(tl.int64)[:, None] * stride_y_token
    tl.store(rows + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _finish(acc, y_ptr, w_scales_ptr, bias_ptr, partials_ptr, counters_ptr, offs_m, offs_n,
            num_tokens, out_features, split_k, stride_y_token, HAS_BIAS: tl.constexpr,
            SPLIT: tl.constexpr):  # fmt: skip
    """y from acc [BLOCK_M, BLOCK_N] when K is not split; otherwise this split's partial is
    stored and the last split of the tile to arrive adds all of them in split order, writes y
    and resets the tile's counter."""
    n_valid = offs_n < out_features
    out_mask = (offs_m < num_tokens)[:, None] & n_valid[None, :]
    if not SPLIT:
        _write_y(acc, y_ptr, w_scales_ptr, bias_ptr, offs_m, offs_n, out_mask, n_valid,
                 stride_y_token, HAS_BIAS)  # fmt: skip
    else:
        # partials [split_k, num_tokens, out_features] fp32, contiguous
        tile = offs_m[:, None] * out_features + offs_n[None, :]
        split_size = num_tokens * out_features
        partials = partials_ptr + tile
        tl.store(partials + tl.program_id(1) * split_size, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is stored before the release below
        counter = counters_ptr + tl.program_id(0)
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == split_k - 1:  # the last split: every partial is visible now
            total = tl.zeros_like(acc)
            for split in range(split_k):  # in split order: the same bits every run
                total += tl.load(
                    partials + split * split_size,
                    mask=out_mask,
                    other=0.0,
                    cache_modifier=".cg",  # written by other SMs: read from L2
                )
            _write_y(total, y_ptr, w_scales_ptr, bias_ptr, offs_m, offs_n, out_mask,
                     n_valid, stride_y_token, HAS_BIAS)  # fmt: skip
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@triton.jit
def fp8_splitk_fma_kernel(
    x_ptr, w_ptr, w_scales_ptr, bias_ptr, y_ptr, partials_ptr, counters_ptr,
    num_tokens, out_features, in_features, k_per_split, split_k,
    stride_x_token, stride_w_row, stride_y_token,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    PREFETCH: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """Up to 4 tokens on the CUDA cores: one fp32 [BLOCK_N, BLOCK_K] accumulator per token in
    the layout the weight is loaded in, so the loop has no layout change and no shuffle; the
    sum over K happens once, after the loop."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_valid = offs_n < out_features
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w_row  # [BLOCK_N, 1]
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1, acc2, acc3 = acc0, acc0, acc0  # unused (and dropped) past BLOCK_M tokens
    if PREFETCH:
        kk, k_mask = _k_mask(k_start, k_end, offs_k, EVEN_K)
        chunk = _fma_chunk(x_ptr, w_rows, kk, k_mask, n_valid, num_tokens,
                           stride_x_token, BLOCK_M, EVEN_K)  # fmt: skip
        for k in range(k_start, k_end, BLOCK_K):
            w, x0, x1, x2, x3 = chunk
            # The next chunk's loads go out before this chunk's products wait on their own.
            kk, k_mask = _k_mask(k + BLOCK_K, k_end, offs_k, EVEN_K)
            chunk = _fma_chunk(x_ptr, w_rows, kk, k_mask, n_valid, num_tokens,
                               stride_x_token, BLOCK_M, EVEN_K)  # fmt: skip
            w = w.to(tl.float32)
            acc0 = _fma(acc0, w, x0, 0, BLOCK_M)
            acc1 = _fma(acc1, w, x1, 1, BLOCK_M)
            acc2 = _fma(acc2, w, x2, 2, BLOCK_M)
            acc3 = _fma(acc3, w, x3, 3, BLOCK_M)
    else:
        for k in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
            kk, k_mask = _k_mask(k, k_end, offs_k, EVEN_K)
            w, x0, x1, x2, x3 = _fma_chunk(x_ptr, w_rows, kk, k_mask, n_valid, num_tokens,
                                           stride_x_token, BLOCK_M, EVEN_K)  # fmt: skip
            w = w.to(tl.float32)
            acc0 = _fma(acc0, w, x0, 0, BLOCK_M)
            acc1 = _fma(acc1, w, x1, 1, BLOCK_M)
            acc2 = _fma(acc2, w, x2, 2, BLOCK_M)
            acc3 = _fma(acc3, w, x3, 3, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tile = _place(tile, acc0, offs_m, 0, BLOCK_M)
    tile = _place(tile, acc1, offs_m, 1, BLOCK_M)
    tile = _place(tile, acc2, offs_m, 2, BLOCK_M)
    tile = _place(tile, acc3, offs_m, 3, BLOCK_M)
    _finish(tile, y_ptr, w_scales_ptr, bias_ptr, partials_ptr, counters_ptr, offs_m, offs_n,
            num_tokens, out_features, split_k, stride_y_token, HAS_BIAS, SPLIT)  # fmt: skip


@triton.jit
def _mma_chunk(x_rows, w_rows, kk, k_mask, m_valid, n_valid, EVEN_K: tl.constexpr):
    """(x [BLOCK_M, BLOCK_K], w [BLOCK_N, BLOCK_K] fp8) of one K chunk."""
    if EVEN_K:
        x_mask = m_valid[:, None] & k_mask
        w_mask = n_valid[:, None] & k_mask
    else:
        x_mask = m_valid[:, None] & k_mask[None, :]
        w_mask = n_valid[:, None] & k_mask[None, :]
    w = tl.load(w_rows + kk[None, :], mask=w_mask, other=0.0)
    x = tl.load(x_rows + kk[None, :], mask=x_mask, other=0.0)
    return x, w


@triton.jit
def fp8_splitk_mma_kernel(
    x_ptr, w_ptr, w_scales_ptr, bias_ptr, y_ptr, partials_ptr, counters_ptr,
    num_tokens, out_features, in_features, k_per_split, split_k,
    stride_x_token, stride_w_row, stride_y_token,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    PREFETCH: tl.constexpr, NUM_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """1 to 64 tokens on the tensor cores: yᵀ [BLOCK_N, BLOCK_M] += W · xᵀ, W in x's dtype."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_valid = offs_m < num_tokens
    n_valid = offs_n < out_features
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x_token  # [BLOCK_M, 1]
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w_row  # [BLOCK_N, 1]
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if PREFETCH:
        kk, k_mask = _k_mask(k_start, k_end, offs_k, EVEN_K)
        x_next, w_next = _mma_chunk(
            x_rows, w_rows, kk, k_mask, m_valid, n_valid, EVEN_K
        )
        for k in range(k_start, k_end, BLOCK_K):
            x, w = x_next, w_next
            kk, k_mask = _k_mask(k + BLOCK_K, k_end, offs_k, EVEN_K)
            x_next, w_next = _mma_chunk(
                x_rows, w_rows, kk, k_mask, m_valid, n_valid, EVEN_K
            )
            acc = tl.dot(w.to(x.dtype), tl.trans(x), acc, input_precision=DOT_PRECISION)
    else:
        for k in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
            kk, k_mask = _k_mask(k, k_end, offs_k, EVEN_K)
            x, w = _mma_chunk(x_rows, w_rows, kk, k_mask, m_valid, n_valid, EVEN_K)
            acc = tl.dot(w.to(x.dtype), tl.trans(x), acc, input_precision=DOT_PRECISION)
    _finish(tl.trans(acc), y_ptr, w_scales_ptr, bias_ptr, partials_ptr, counters_ptr,
            offs_m, offs_n, num_tokens, out_features, split_k, stride_y_token, HAS_BIAS,
            SPLIT)  # fmt: skip
