"""FP8 (e4m3) linears: per-output-channel weight scales, per-token dynamic activation scales.

Public ops:
- `quantize_weight(w)`: e4m3 weight and [out, 1] float32 scales (torch ops on w's device; runs
  once, at load or build time).
- `quantize_per_token(x)`: e4m3 activations and [tokens, 1] float32 scales.
- `fp8_linear(x, weight_q, weight_scales, bias)`: y = (q_x · s_x) @ (q_w · s_w)ᵀ + b in x's dtype.
- `scaled_mm(...)`: the `torch._scaled_mm` call with row-wise scales, as the dispatch runs it.
- `reserve_workspace(device)`: the split-K counters (gemm.py's and splitk.py's), made before
  CUDA graphs are captured.

`backend="auto"` runs on CUDA what the dispatch table (dispatch.py) picks per (M, N, K) and on
CPU the torch reference; `"torch"` forces the reference; `"triton"` forces the Triton kernels
(on CPU tensors in Triton's interpreter). Nothing falls back silently from one to another.
"""

from __future__ import annotations

from typing import Literal

import torch

from .reference import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_reference,
    fp8_gemm_reference,
    fp8_linear_reference,
    quantize_per_channel_reference,
    quantize_per_token_reference,
)

Backend = Literal["auto", "torch", "triton"]

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "Backend",
    "dequantize_reference",
    "fp8_gemm_reference",
    "fp8_linear",
    "fp8_linear_reference",
    "quantize_per_channel_reference",
    "quantize_per_token",
    "quantize_per_token_reference",
    "quantize_weight",
    "reserve_workspace",
    "scaled_mm",
]


def resolve_backend(
    backend: Backend, tensor: torch.Tensor
) -> Literal["torch", "triton"]:
    """The backend that will run for `backend` on tensors living where `tensor` lives."""
    if backend == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(
            f"unknown FP8 backend {backend!r}; expected 'auto', 'torch' or 'triton'"
        )
    return backend


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q = clamp(round_e4m3(w / s), ±448), s[o] = max|w[o, :]| / 448, on w's device.

    :param weight: [out_features, in_features] float.
    :return: (q [out_features, in_features] float8_e4m3fn, scales [out_features, 1] float32).
    """
    return quantize_per_channel_reference(weight)


def quantize_per_token(
    x: torch.Tensor, *, backend: Backend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """q[t] = clamp(round_e4m3(x[t] / s[t]), ±448), s[t] = max|x[t, :]| / 448.

    :param x: [num_tokens, features] bf16/fp16/fp32.
    :return: (q [num_tokens, features] float8_e4m3fn, scales [num_tokens, 1] float32).
    """
    if resolve_backend(backend, x) == "torch":
        return quantize_per_token_reference(x)
    from . import quant

    return quant.quantize_per_token(x)


def reserve_workspace(device: torch.device) -> None:
    """Make the Triton GEMM's split-K counters on a CUDA device now, before any graph capture
    (the first launch would make them otherwise)."""
    if device.type == "cuda":
        from . import gemm

        gemm.split_counters(device)


def scaled_mm(
    x_q: torch.Tensor,
    x_scales: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """y = (q_x · s_x) @ (q_w · s_w)ᵀ + b through `torch._scaled_mm` with row-wise scales.

    cuBLASLt wants the second operand column-major: the [N, K] row-major weight, transposed,
    is exactly that (no copy). Scales: [M, 1] and [1, N] float32, contiguous.

    :param x_q: [M, K] float8_e4m3fn, row-major; K a multiple of 16.
    :param x_scales: [M, 1] float32.
    :param weight_q: [N, K] float8_e4m3fn, row-major; N a multiple of 16.
    :param weight_scales: [N, 1] float32.
    :param bias: optional [N], added after the GEMM.
    :return: [M, N] out_dtype (bf16 on every GPU; fp16/fp32 only where cuBLASLt runs it).
    """
    y = torch._scaled_mm(
        x_q,
        weight_q.t(),
        scale_a=x_scales,
        scale_b=weight_scales.view(1, -1),
        out_dtype=out_dtype,
    )
    if bias is not None:
        y += bias
    return y


def fp8_linear(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: Backend = "auto",
    choice=None,
) -> torch.Tensor:
    """y = (q_x · s_x) @ (q_w · s_w)ᵀ + b, x quantized per token on the fly; y in x's dtype.

    :param x: [num_tokens, in_features] bf16/fp16/fp32, unit stride along features.
    :param weight_q: [out_features, in_features] float8_e4m3fn.
    :param weight_scales: [out_features, 1] float32.
    :param bias: optional [out_features] in x's dtype.
    :param backend: "auto" (the dispatch table on CUDA, the reference on CPU), "torch" or
        "triton" (the table's Triton choices only).
    :param choice: a `dispatch.GemmChoice` that overrides the table (benchmarks, tests).
    :return: [num_tokens, out_features] in x's dtype.
    """
    if resolve_backend(backend, x) == "torch":
        return fp8_linear_reference(x, weight_q, weight_scales, bias, x.dtype)
    from . import dispatch, gemm, gemv, quant, splitk

    if x.stride(-1) != 1:
        x = x.contiguous()
    if choice is None:
        (m, k), n = x.shape, weight_q.shape[0]
        triton_only = backend == "triton" or not x.is_cuda
        choice = dispatch.choose(m, n, k, x.dtype, x.device, triton_only)
    if choice.impl == "gemv":
        return gemv.fp8_gemv(x, weight_q, weight_scales, choice.config, bias=bias)
    if choice.impl == "splitk":
        return splitk.fp8_splitk(x, weight_q, weight_scales, choice.config, bias=bias)
    if choice.impl == "triton_fused":
        return gemm.fp8_gemm(
            x,
            None,
            weight_q,
            weight_scales,
            choice.config,
            bias=bias,
            out_dtype=x.dtype,
        )
    x_q, x_scales = quant.quantize_per_token(x)
    if choice.impl == "triton":
        return gemm.fp8_gemm(
            x_q,
            x_scales,
            weight_q,
            weight_scales,
            choice.config,
            bias=bias,
            out_dtype=x.dtype,
        )
    return scaled_mm(x_q, x_scales, weight_q, weight_scales, bias, x.dtype)
