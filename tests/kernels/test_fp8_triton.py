"""The Triton FP8 kernels on the CPU, in Triton's interpreter, against float64 definitions.

As for the SGMV kernels, the cases run in a child pytest with TRITON_INTERPRET=1 (the
interpreter must be on before triton decorates anything); the parent only starts it. The dispatch
table and the `_scaled_mm` wrapper need no interpreter and run in the parent.
"""

from __future__ import annotations

import pytest
import torch
from fp8_cases import expected_y, make_weight, relative_error, representable_x

from interpreter import run_in_interpreter
from loraplex.kernels import fp8
from loraplex.kernels.fp8 import (
    FP8_DTYPE,
    quantize_per_token_reference,
)
from loraplex.kernels.fp8.dispatch import (
    M_BUCKETS,
    SCALED_MM,
    TABLE,
    GemmChoice,
    choose,
    default_choice,
    default_mma_choice,
)
from loraplex.kernels.fp8.gemm import GemmConfig

TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3}


def test_kernels_in_the_interpreter():
    """Runs this file's interpreter cases in a child process with TRITON_INTERPRET=1."""
    run_in_interpreter(__file__)


def interpreted(test):
    """Marks a case for the TRITON_INTERPRET=1 child; the parent deselects it (conftest.py)."""
    test.interpreter_only = True
    return test


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("features", [48, 160, 16400])  # 16400: the two-pass path
def test_quantize_per_token_is_the_reference_bit_for_bit(dtype, features):
    from loraplex.kernels.fp8.quant import quantize_per_token

    gen = torch.Generator().manual_seed(features)
    x = representable_x(5, features, dtype, gen)
    x[2] = 0  # an all-zero token: tiny scale, zero codes
    q = torch.full(x.shape, float("nan")).to(FP8_DTYPE)
    scales = torch.full((5, 1), float("nan"))
    quantize_per_token(x, out=q, scales=scales)
    q_ref, scales_ref = quantize_per_token_reference(x)
    assert torch.equal(scales, scales_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


# (M, N, K, config): one token to several token tiles, K blocks that do not divide K, every
# split-K path (including more splits asked for than K blocks exist).
GEMM_CASES = [
    (1, 48, 64, "16x16x32/s1/w4/st2"),
    (1, 96, 160, "16x32x64/s2/w4/st2"),
    (5, 48, 160, "16x16x32/s4/w4/st2"),
    (17, 80, 96, "16x32x32/s2/w4/st2"),
    (40, 64, 128, "32x32x64/s8/w4/st2"),
    (3, 32, 40, "16x16x32/s2/w4/st1"),
]


@interpreted
@pytest.mark.parametrize("fused", [False, True], ids=["quantized_x", "fused"])
@pytest.mark.parametrize("case", GEMM_CASES, ids=[c[3] for c in GEMM_CASES])
def test_gemm_against_float64(case, fused):
    from loraplex.kernels.fp8 import gemm

    m, n, k, config = case
    for dtype, has_bias in ((torch.float32, False), (torch.float16, True)):
        gen = torch.Generator().manual_seed(m * n + k)
        x = representable_x(m, k, dtype, gen)
        w_q, w_scales = make_weight(n, k, gen)
        bias = torch.randn(n, generator=gen).to(dtype) if has_bias else None
        x_q, x_scales = quantize_per_token_reference(x)
        y = torch.full((m, n), float("nan"), dtype=dtype)  # every entry must be written
        gemm.fp8_gemm(
            x if fused else x_q,
            None if fused else x_scales,
            w_q,
            w_scales,
            GemmConfig.parse(config),
            bias=bias,
            out_dtype=dtype,
            out=y,
        )
        assert torch.isfinite(y).all(), "an entry of y was never written"
        expected = expected_y(x_q, x_scales, w_q, w_scales, bias)
        assert relative_error(y, expected) < TOLERANCE[dtype]
    counters = gemm._counters.get(torch.device("cpu"))
    assert counters is None or not counters.any(), "the last split resets its counter"


@interpreted
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 16, 33])  # 5+: the tensor-core path
@pytest.mark.parametrize(
    ("n", "k", "config"),
    [(48, 64, "16x64/st2"), (100, 200, "32x128/st3"), (33, 96, "16x32/st1")],
)
def test_gemv_against_float64(m, n, k, config):
    from loraplex.kernels.fp8 import gemv

    for dtype, has_bias in ((torch.float32, False), (torch.float16, True)):
        gen = torch.Generator().manual_seed(m * n + k)
        x = torch.randn(m, k, generator=gen).to(dtype)
        w_q, w_scales = make_weight(n, k, gen)
        bias = torch.randn(n, generator=gen).to(dtype) if has_bias else None
        y = torch.full((m, n), float("nan"), dtype=dtype)  # every entry must be written
        gemv.fp8_gemv(x, w_q, w_scales, gemv.GemvConfig.parse(config), bias=bias, out=y)
        expected = x.double() @ (w_q.double() * w_scales.double()).T
        if bias is not None:
            expected += bias.double()
        assert torch.isfinite(y).all(), "an entry of y was never written"
        assert relative_error(y, expected) < TOLERANCE[dtype]


@interpreted
def test_fp8_linear_runs_the_table_in_triton_and_matches_the_reference():
    gen = torch.Generator().manual_seed(7)
    for m in (
        1,
        2,
        9,
        300,
    ):  # fused, triton, and above the buckets (never _scaled_mm here)
        x = representable_x(m, 64, torch.float32, gen)
        w_q, w_scales = make_weight(48, 64, gen)
        y = fp8.fp8_linear(x, w_q, w_scales, backend="triton")
        reference = fp8.fp8_linear(x, w_q, w_scales, backend="torch")
        assert y.dtype == x.dtype and y.shape == (m, 48)
        assert relative_error(y, reference.double()) < TOLERANCE[torch.float32]


def test_scaled_mm_wrapper_is_the_gemm_reference():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 64, generator=gen)
    w_q, w_scales = make_weight(32, 64, gen)
    bias = torch.randn(32, generator=gen)
    x_q, x_scales = quantize_per_token_reference(x)
    try:
        y = fp8.scaled_mm(x_q, x_scales, w_q, w_scales, bias, torch.float32)
    except (RuntimeError, NotImplementedError) as exc:  # CPU _scaled_mm is recent
        pytest.skip(f"torch {torch.__version__} has no CPU _scaled_mm: {exc}")
    expected = expected_y(x_q, x_scales, w_q, w_scales, bias)
    assert relative_error(y, expected) < 1e-6


def test_every_table_entry_parses_and_prints_back():
    for by_shape in TABLE.values():
        for (n, k), row in by_shape.items():
            assert set(row) <= set(M_BUCKETS), (n, k)
            for text in row.values():
                choice = GemmChoice.parse(text)
                assert str(choice) == text
                if choice.config is not None:
                    choice.config.check()
    for bad in ("triton", "scaled_mm 16x16x32/s1/w4/st2", "cutlass", "triton 16x16"):
        with pytest.raises(ValueError):
            GemmChoice.parse(bad)
    with pytest.raises(ValueError):
        GemmConfig(16, 24, 32).check()


def test_dispatch_rules():
    cpu = torch.device("cpu")
    bf16, fp32 = torch.bfloat16, torch.float32
    assert choose(8192, 4096, 4096, bf16, cpu) == SCALED_MM  # prefill
    assert (
        choose(8192, 4096, 4096, fp32, cpu).impl == "triton"
    )  # _scaled_mm: bf16 out only
    assert (
        choose(8192, 4104, 4096, bf16, cpu).impl == "triton"
    )  # N not a multiple of 16
    assert choose(8192, 4096, 4096, bf16, cpu, triton_only=True).impl == "triton"
    assert choose(3, 4096, 4096, bf16, cpu) == default_choice(4, 4096, 4096, 4)
    # Up to four tokens, the weight-only GEMV, with several programs per SM.
    for m in (1, 2, 3, 4):
        choice = choose(m, 4096, 14336, bf16, cpu)
        assert choice.impl == "gemv" and -(-4096 // choice.config.block_n) >= 4 * 4
    assert choose(5, 4096, 4096, bf16, cpu).impl != "gemv"
    # The decode heuristic fills 132 SMs twice where it can, keeping 2+ K blocks per split.
    for bucket in M_BUCKETS:
        for n, k in ((4096, 4096), (4096, 14336), (28672, 4096)):
            config = default_mma_choice(bucket, n, k, 132).config
            tiles = -(-bucket // config.block_m) * -(-n // config.block_n)
            k_blocks = -(-k // config.block_k)
            assert k_blocks // config.split_k >= 2
            assert tiles * config.split_k >= 264 or k_blocks // config.split_k < 4
