"""q = clamp(round_e4m3(w / s), ±448) with s[o] = max|w[o, :]| / 448 per output channel; w ≈ q · s.

Torch references for FP8 (e4m3) weights with per-output-channel scales and activations with
per-token dynamic scales: the spec the FP8 engine's GEMMs are checked against.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
_MIN_SCALE = 1e-12  # keeps all-zero rows finite: their scale is tiny, their quantized values zero


def quantize_per_channel_reference(
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight to e4m3 with one float32 scale per output row.

    :param weight: [out_features, in_features] float.
    :return: (quantized [out_features, in_features] float8_e4m3fn, scales [out_features, 1] float32).
    """
    w = weight.float()
    scales = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (w / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to e4m3 with one dynamic float32 scale per token (row).

    :param x: [num_tokens, features] float.
    :return: (quantized [num_tokens, features] float8_e4m3fn, scales [num_tokens, 1] float32).
    """
    return quantize_per_channel_reference(x)


def dequantize_reference(quantized: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """w ≈ q · s, in float32.

    :param quantized: [rows, cols] float8_e4m3fn.
    :param scales: [rows, 1] float32.
    """
    return quantized.float() * scales


def fp8_gemm_reference(
    x_q: torch.Tensor,
    x_scales: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """y = (q_x · s_x) @ (q_w · s_w)ᵀ + b, accumulated in float32, then cast to out_dtype.

    The spec of the FP8 GEMMs (`torch._scaled_mm` with row-wise scales and the Triton kernel).

    :param x_q: [num_tokens, in_features] float8_e4m3fn.
    :param x_scales: [num_tokens, 1] float32.
    :param weight_q: [out_features, in_features] float8_e4m3fn.
    :param weight_scales: [out_features, 1] float32.
    :param bias: optional [out_features], any float dtype.
    :return: [num_tokens, out_features] out_dtype.
    """
    y = (
        dequantize_reference(x_q, x_scales)
        @ dequantize_reference(weight_q, weight_scales).T
    )
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def fp8_linear_reference(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """y = (q_x · s_x) @ (q_w · s_w)ᵀ + b with x quantized per token first (the FP8 linear).

    :param x: [num_tokens, in_features] float.
    :param weight_q: [out_features, in_features] float8_e4m3fn.
    :param weight_scales: [out_features, 1] float32.
    :param bias: optional [out_features].
    :return: [num_tokens, out_features] out_dtype (float32 by default).
    """
    x_q, x_scales = quantize_per_token_reference(x)
    return fp8_gemm_reference(x_q, x_scales, weight_q, weight_scales, bias, out_dtype)


def fp8_gemv_reference(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """y = x @ (q_w · s_w)ᵀ + b with x unquantized: the spec of the weight-only GEMV.

    :param x: [num_tokens, in_features] float.
    :param weight_q: [out_features, in_features] float8_e4m3fn.
    :param weight_scales: [out_features, 1] float32.
    :param bias: optional [out_features].
    :return: [num_tokens, out_features] out_dtype (float32 by default).
    """
    y = x.float() @ dequantize_reference(weight_q, weight_scales).T
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
