"""FP8 references: per-channel / per-token e4m3 quantization error stays within e4m3's precision."""

from __future__ import annotations

import torch

from loraplex.kernels.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_reference,
    fp8_linear_reference,
    quantize_per_channel_reference,
    quantize_per_token_reference,
)


def test_per_channel_round_trip():
    gen = torch.Generator().manual_seed(0)
    # Rows of very different magnitudes: a per-tensor scale would crush the small ones.
    w = torch.randn(64, 128, generator=gen) * torch.logspace(-3, 2, 64)[:, None]
    q, scales = quantize_per_channel_reference(w)
    assert q.dtype == FP8_DTYPE and scales.shape == (64, 1)
    assert q.float().abs().amax(dim=1).max() <= FP8_MAX
    back = dequantize_reference(q, scales)
    row_err = (back - w).norm(dim=1) / w.norm(dim=1)
    assert row_err.max() < 0.04  # e4m3 keeps 3 mantissa bits: ~2-3% relative error


def test_fp8_linear_is_close_to_the_float_linear():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 96, generator=gen)
    w = torch.randn(48, 96, generator=gen) * 0.05
    q, scales = quantize_per_channel_reference(w)
    y = fp8_linear_reference(x, q, scales)
    ref = x.double() @ w.double().T
    assert ((y.double() - ref).norm() / ref.norm()).item() < 0.05


def test_all_zero_rows_stay_finite():
    q, scales = quantize_per_channel_reference(torch.zeros(2, 8))
    assert torch.isfinite(dequantize_reference(q, scales)).all()
    assert torch.equal(dequantize_reference(q, scales), torch.zeros(2, 8))


def test_per_token_quantization_is_float64_math_rounded_to_the_nearest_e4m3():
    """s = max|x| / 448 (float32 of the float64 quotient), q = the e4m3 value nearest x / s."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(32, 200, generator=gen) * torch.logspace(-4, 4, 32)[:, None]
    q, scales = quantize_per_token_reference(x)
    x64 = x.double()
    expected_scales = x64.abs().amax(dim=1, keepdim=True) / FP8_MAX
    assert torch.equal(scales, expected_scales.float())
    grid = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).double()
    grid = grid[torch.isfinite(grid)].unique()  # sorted, ±448 at the ends
    target = (x64 / scales.double()).flatten()
    upper = torch.searchsorted(grid, target).clamp(1, len(grid) - 1)
    nearest = torch.minimum(
        (grid[upper] - target).abs(), (grid[upper - 1] - target).abs()
    )
    error = (q.double().flatten() - target).abs()
    assert torch.all(error <= nearest * (1 + 1e-12) + 1e-300)
    assert torch.all(
        q.double().abs().amax(dim=1) == FP8_MAX
    )  # each row's largest hits 448
