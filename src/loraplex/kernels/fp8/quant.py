"""q[t] = clamp(round_e4m3(x[t] / s[t]), ±448) with s[t] = max(max_k |x[t, k]| / 448, 1e-12).

Per-token dynamic activation quantization in Triton: one program per token reads its row once
(rows up to 16384 features stay in registers between the absmax and the cast; longer rows are
read a second time, from L2), divides with IEEE rounding (`div_rn`, as torch divides) and casts
with round-to-nearest-even, so that the result equals `quantize_per_token_reference` bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import FP8_MAX, MIN_SCALE, QUANT_DTYPES, kernel_for, next_pow2

ONE_PASS_MAX_FEATURES = 16384


@triton.jit
def quantize_per_token_kernel(
    x_ptr,
    q_ptr,
    scales_ptr,
    num_features,
    stride_x_token,
    stride_q_token,
    BLOCK_K: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + token * stride_x_token
    q_row = q_ptr + token * stride_q_token
    offs = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        mask = offs < num_features
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.maximum(tl.math.div_rn(amax, FP8_MAX), MIN_SCALE)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX)
        tl.store(q_row + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k in range(0, num_features, BLOCK_K):
            mask = k + offs < num_features
            x = tl.load(x_row + k + offs, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), FP8_MAX), MIN_SCALE)
        for k in range(0, num_features, BLOCK_K):
            mask = k + offs < num_features
            x = tl.load(x_row + k + offs, mask=mask, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX)
            tl.store(q_row + k + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scales_ptr + token, scale)


def quantize_per_token(
    x: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the per-token quantization (see the module docstring).

    :param x: [num_tokens, features] bf16/fp16/fp32, unit stride along features.
    :param out: optional [num_tokens, features] float8_e4m3fn to write into (tests poison it).
    :param scales: optional [num_tokens, 1] float32 to write into.
    :return: (q [num_tokens, features] float8_e4m3fn, scales [num_tokens, 1] float32).
    """
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(
            "x must be [num_tokens, features] with unit stride along features"
        )
    if x.dtype not in QUANT_DTYPES:
        raise TypeError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    num_tokens, num_features = x.shape
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    if scales is None:
        scales = torch.empty(num_tokens, 1, dtype=torch.float32, device=x.device)
    if out.shape != x.shape or out.dtype != torch.float8_e4m3fn or out.stride(1) != 1:
        raise ValueError(f"out must be {tuple(x.shape)} float8_e4m3fn, unit stride")
    if scales.shape != (num_tokens, 1) or scales.dtype != torch.float32:
        raise ValueError(f"scales must be [{num_tokens}, 1] float32")
    if not scales.is_contiguous():
        raise ValueError("scales must be contiguous")
    if num_tokens == 0:
        return out, scales
    one_pass = num_features <= ONE_PASS_MAX_FEATURES
    block_k = next_pow2(num_features) if one_pass else 4096
    kernel_for(quantize_per_token_kernel, x)[(num_tokens,)](
        x,
        out,
        scales,
        num_features,
        x.stride(0),
        out.stride(0),
        BLOCK_K=block_k,
        ONE_PASS=one_pass,
        num_warps=min(16, max(1, block_k // 512)),
    )
    return out, scales
