"""Inputs and float64 definitions shared by the FP8 kernel tests (interpreter and GPU)."""

from __future__ import annotations

import torch

from loraplex.kernels.fp8 import FP8_DTYPE, FP8_MAX, quantize_weight

# The Llama-3.1-8B linears as (name, N, K).
LLAMA_8B = (
    ("qkv", 6144, 4096),
    ("o", 4096, 4096),
    ("gate_up", 28672, 4096),
    ("down", 4096, 14336),
)


def representable_x(
    num_tokens: int,
    features: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Activations whose per-token quantization needs no rounding: e4m3 values times a power of
    two per row, each row holding ±448 times that power (so its scale is the power exactly).

    Triton's interpreter rounds float → e4m3 wrongly when rounding carries into the exponent;
    these inputs test the kernels' logic there. On the GPU the tests use plain random inputs.
    """
    codes = torch.randint(0, 256, (num_tokens, features), generator=generator)
    codes[(codes & 0x7F) == 0x7F] = 0  # e4m3fn's NaNs
    values = codes.to(torch.uint8).view(FP8_DTYPE).float()
    values[:, features // 3] = FP8_MAX
    powers = torch.randint(-8, 4, (num_tokens, 1), generator=generator).float()
    return (values * 2.0**powers).to(dtype).to(device)


def make_weight(
    out_features: int,
    in_features: int,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized random weight with rows of different magnitudes: (q [N, K] e4m3, s [N, 1])."""
    w = torch.randn(out_features, in_features, generator=generator)
    w *= torch.logspace(-2, 0, out_features)[
        torch.randperm(out_features, generator=generator)
    ][:, None]
    return quantize_weight(w.to(device) * in_features**-0.5)


def expected_y(
    x_q: torch.Tensor,
    x_scales: torch.Tensor,
    w_q: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = (q_x · s_x) @ (q_w · s_w)ᵀ + b in float64."""
    y = (x_q.double() * x_scales.double()) @ (w_q.double() * w_scales.double()).T
    return y if bias is None else y + bias.double()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64; NaN anywhere makes it NaN (never passes)."""
    actual = actual.double().to(expected.device)
    return float((actual - expected).norm() / expected.norm())
