"""The FP8 kernels on a CUDA GPU (pytest -m gpu): Triton quantization and GEMM, the `_scaled_mm`
wrapper and the dispatch, against float64, on the Llama-3.1-8B linears.

Every case draws fresh random inputs and writes into NaN-poisoned outputs (the Triton GEMM's
`out`; for `_scaled_mm`, whose output is its own, the allocator's free memory is poisoned first).
CUDA graphs must replay exactly what the eager launches compute.
"""

from __future__ import annotations

import pytest
import torch
from fp8_cases import LLAMA_8B, expected_y, make_weight, relative_error

from loraplex.kernels import fp8
from loraplex.kernels.fp8 import (
    FP8_DTYPE,
    dispatch,
    gemm,
    quant,
    quantize_per_token_reference,
)

pytestmark = pytest.mark.gpu

TOKENS = (1, 2, 8, 16, 64, 128, 256, 1024, 8192)
# bf16/fp16: the output's rounding; fp32: Hopper's FP8 MMA sums 128 products at ~14 bits.
TOLERANCE = {torch.bfloat16: 5e-3, torch.float16: 2e-3, torch.float32: 1e-3}
FUSED_MAX_TOKENS = (
    256  # beyond, the fused kernel re-reads x per program: not a real choice
)
CUDA = torch.device("cuda")


def _inputs(m: int, n: int, k: int, seed: int, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    w_q, w_scales = make_weight(n, k, gen, device=CUDA)
    # Tokens of very different magnitudes, and a few outliers: per-token scales matter.
    x = torch.randn(m, k, generator=gen) * torch.logspace(-1, 1, m)[:, None]
    x[:, torch.randint(0, k, (4,), generator=gen)] *= 20
    return x.to(dtype).to(CUDA), w_q, w_scales


def _poison_allocator(num_bytes: int) -> None:
    """Fill free memory the caching allocator will hand out next with NaN."""
    junk = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=CUDA)
    junk.fill_(float("nan"))
    del junk


def _triton_choice(m: int, n: int, k: int, fused: bool) -> dispatch.GemmChoice:
    choice = dispatch.choose(m, n, k, torch.bfloat16, CUDA, triton_only=True)
    if choice.impl == "gemv":  # the MMA kernel is still what this test holds to float64
        sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
        choice = dispatch.default_mma_choice(dispatch.m_bucket(m), n, k, sms)
    impl = "triton_fused" if fused else "triton"
    return dispatch.GemmChoice(impl, choice.config)


@pytest.mark.parametrize("m", TOKENS)
def test_quantize_per_token_matches_the_reference(m):
    gen = torch.Generator().manual_seed(m)
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    features_each = (4096, 14336, 20000)  # 20000: the two-pass path
    for dtype, features in zip(dtypes, features_each, strict=True):
        x = torch.randn(m, features, generator=gen) * torch.logspace(-2, 2, m)[:, None]
        x = x.to(dtype).to(CUDA)
        q = torch.full(x.shape, float("nan"), device=CUDA).to(FP8_DTYPE)
        scales = torch.full((m, 1), float("nan"), device=CUDA)
        quant.quantize_per_token(x, out=q, scales=scales)
        q_ref, scales_ref = quantize_per_token_reference(x)
        torch.testing.assert_close(scales, scales_ref, rtol=1e-6, atol=0)
        # IEEE division on both sides; the casts to e4m3 may round a near-tie differently
        # (measured on an H100, 2026-11-27: 0.03% to 0.1% of codes, each one code apart, as a
        # cast through an intermediate format would). Never more than one code.
        codes, codes_ref = q.view(torch.uint8).int(), q_ref.view(torch.uint8).int()
        differ = codes != codes_ref
        assert differ.float().mean().item() <= 2e-3
        assert ((codes - codes_ref).abs()[differ] <= 1).all()


@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("shape", LLAMA_8B, ids=[s[0] for s in LLAMA_8B])
def test_gemms_against_float64(shape, m):
    _, n, k = shape
    x, w_q, w_scales = _inputs(m, n, k, seed=m * 7 + n)
    x_q, x_scales = quant.quantize_per_token(x)
    expected = expected_y(x_q, x_scales, w_q, w_scales)
    tolerance = TOLERANCE[torch.bfloat16]
    for fused in (False, True):
        if fused and m > FUSED_MAX_TOKENS:
            continue
        choice = _triton_choice(m, n, k, fused)
        y = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=CUDA)
        gemm.fp8_gemm(
            x if fused else x_q,
            None if fused else x_scales,
            w_q,
            w_scales,
            choice.config,
            out=y,
        )
        assert torch.isfinite(y).all(), f"{choice}: an entry of y was never written"
        assert relative_error(y, expected) < tolerance, str(choice)
    _poison_allocator(4 * m * n + (1 << 20))
    y = fp8.scaled_mm(x_q, x_scales, w_q, w_scales, out_dtype=torch.bfloat16)
    assert relative_error(y, expected) < tolerance, "scaled_mm"
    _poison_allocator(4 * m * n + (1 << 20))
    y = fp8.fp8_linear(x, w_q, w_scales)  # whatever the table picks
    picked = dispatch.choose(m, n, k, torch.bfloat16, CUDA)
    if picked.impl == "gemv":  # weight-only: x is not quantized
        expected = x.double() @ (w_q.double() * w_scales.double()).T
    assert relative_error(y, expected) < tolerance, str(picked)
    assert not gemm.split_counters(CUDA).any(), "a split-K counter was left non-zero"


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_other_output_dtypes_and_bias(m, out_dtype):
    """fp16 and fp32 activations (the dispatch never gives them to _scaled_mm), with a bias."""
    n, k = 4096, 4096
    x, w_q, w_scales = _inputs(m, n, k, seed=m, dtype=out_dtype)
    bias = torch.randn(n, device=CUDA).to(out_dtype)
    x_q, x_scales = quant.quantize_per_token(x)
    y = fp8.fp8_linear(x, w_q, w_scales, bias)
    assert y.dtype == out_dtype
    expected = expected_y(x_q, x_scales, w_q, w_scales, bias)
    if dispatch.choose(m, n, k, out_dtype, CUDA).impl == "gemv":  # x not quantized
        expected = x.double() @ (w_q.double() * w_scales.double()).T + bias.double()
    assert relative_error(y, expected) < TOLERANCE[out_dtype]


@pytest.mark.parametrize("m", [1, 2, 8, 64, 256, 8192])
def test_cuda_graph_replays_what_eager_computes(m):
    _, n, k = LLAMA_8B[3]  # down: split-K at decode sizes
    x, w_q, w_scales = _inputs(m, n, k, seed=100 + m)
    choices = [dispatch.choose(m, n, k, torch.bfloat16, CUDA), dispatch.SCALED_MM]
    choices.append(_triton_choice(m, n, k, fused=False))
    if m <= FUSED_MAX_TOKENS:
        choices.append(_triton_choice(m, n, k, fused=True))
    static_x = x.clone()
    for choice in choices:
        fp8.fp8_linear(static_x, w_q, w_scales, choice=choice)  # compile, warm up
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = fp8.fp8_linear(static_x, w_q, w_scales, choice=choice)
        for seed in range(3):  # fresh inputs through the same static buffer
            fresh, _, _ = _inputs(m, n, k, seed=seed)
            static_x.copy_(fresh)
            static_y.fill_(float("nan"))
            graph.replay()
            eager = fp8.fp8_linear(fresh, w_q, w_scales, choice=choice)
            torch.cuda.synchronize()
            if choice.impl == "scaled_mm":  # cuBLASLt's own algorithm choice
                torch.testing.assert_close(static_y, eager, rtol=1e-2, atol=1e-3)
            else:
                assert torch.equal(static_y, eager), str(choice)
        del graph
    assert not gemm.split_counters(CUDA).any()


@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16, 40, 64])
@pytest.mark.parametrize("shape", LLAMA_8B, ids=[s[0] for s in LLAMA_8B])
def test_gemv_against_float64(shape, m):
    from loraplex.kernels.fp8 import gemv

    _, n, k = shape
    x, w_q, w_scales = _inputs(m, n, k, seed=m * 11 + n)
    expected = x.double() @ (w_q.double() * w_scales.double()).T
    configs = [gemv.default_gemv_config(n, 132, m), gemv.GemvConfig(32, 256)]
    configs.append(gemv.GemvConfig(4, 1024) if m <= 4 else gemv.GemvConfig(64, 128))
    if m <= 4:  # what runs where the table has no entry
        assert dispatch.default_choice(dispatch.m_bucket(m), n, k, 132).impl == "gemv"
    for config in configs:
        y = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=CUDA)
        gemv.fp8_gemv(x, w_q, w_scales, config, out=y)
        assert relative_error(y, expected) < TOLERANCE[torch.bfloat16], config
    choice = dispatch.GemmChoice("gemv", configs[0])
    graph_y = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=CUDA)
    fp8.fp8_linear(x, w_q, w_scales, choice=choice)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fp8.fp8_linear(x, w_q, w_scales, choice=choice)
    graph.replay()
    graph_y.copy_(captured)
    assert torch.equal(graph_y, fp8.fp8_linear(x, w_q, w_scales, choice=choice))
