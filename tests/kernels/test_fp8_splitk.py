"""The split-K weight-only FP8 kernels (kernels/fp8/splitk.py) on the CPU against float64.

Interpreter cases (Triton's interpreter, fp32 and fp16: numpy has no bf16) run in a child pytest
with TRITON_INTERPRET=1, as in test_fp8_triton.py. Each draws fresh random inputs, writes into a
NaN-poisoned y and holds it to y = x · (q_w · s_w)ᵀ + b in float64 (the definition that
`reference.fp8_gemv_reference` computes in float32). The parent checks the config text, the
dispatch wiring, and that every launch the benchmark sweeps compiles for sm_90 without spills.
"""

from __future__ import annotations

import os

import pytest
import torch
from fp8_cases import make_weight, relative_error

from interpreter import run_in_interpreter
from loraplex.kernels import fp8
from loraplex.kernels.fp8 import dispatch
from loraplex.kernels.fp8.splitk import (
    FMA_MAX_TOKENS,
    PROGRAMS_PER_SM,
    SplitKConfig,
    default_splitk_config,
    sweep,
)

# Relative Frobenius error: fp32 y is the fp32 sum of exact products (K <= 640 here); fp16 y
# carries fp16's rounding of each output (2^-11 relative, ~3e-4 in the norm).
TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3}

# (M, N, K, config): every case splits K unless said otherwise; N is never a multiple of
# BLOCK_N and K of BLOCK_K where said "ragged".
CASES = [
    (1, 40, 512, "16x128/s4/w4/pf"),  # ragged N, even K, 4 splits
    (1, 33, 200, "16x128/s2/w4/st2"),  # ragged N and K
    (2, 48, 640, "16x256/s8/w4/pf"),  # 8 splits asked, 3 K chunks: 3 splits
    (3, 24, 384, "8x128/s3/w2/pf"),  # 3 tokens in a 4-token tile, 3 splits
    (4, 20, 256, "4x128/s1/w4/st1"),  # no split
    (1, 40, 300, "16x128/s2/w4/pf/mma"),  # one token padded to 16, ragged K
    (3, 64, 256, "64x128/s1/w4/pf/mma"),  # one 64-row MMA tile, no split
    (16, 48, 384, "32x128/s3/w4/st2/mma"),
    (
        17,
        33,
        200,
        "16x128/s2/w4/pf/mma",
    ),  # 17 tokens in a 32-token tile, ragged N and K
    (64, 40, 512, "16x128/s4/w4/st3/mma"),
]


def test_kernels_in_the_interpreter():
    """Runs this file's interpreter cases in a child process with TRITON_INTERPRET=1."""
    run_in_interpreter(__file__)


def interpreted(test):
    """Marks a case for the TRITON_INTERPRET=1 child; the parent deselects it (conftest.py)."""
    test.interpreter_only = True
    return test


def _expected(x, w_q, w_scales, bias):
    y = x.double() @ (w_q.double() * w_scales.double()).T
    return y if bias is None else y + bias.double()


@interpreted
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_splitk_against_float64(case):
    from loraplex.kernels.fp8 import gemm, splitk

    m, n, k, text = case
    for dtype, has_bias in ((torch.float32, False), (torch.float16, True)):
        gen = torch.Generator().manual_seed(m * n + k + len(text))
        x = torch.randn(m, k, generator=gen).to(dtype)
        w_q, w_scales = make_weight(n, k, gen)
        bias = torch.randn(n, generator=gen).to(dtype) if has_bias else None
        y = torch.full((m, n), float("nan"), dtype=dtype)  # every entry must be written
        splitk.fp8_splitk(x, w_q, w_scales, SplitKConfig.parse(text), bias=bias, out=y)
        assert torch.isfinite(y).all(), "an entry of y was never written"
        assert relative_error(y, _expected(x, w_q, w_scales, bias)) < TOLERANCE[dtype]
    counters = gemm._counters.get(torch.device("cpu"))
    assert counters is None or not counters.any(), "the last split resets its counter"


@interpreted
def test_fp8_linear_runs_a_splitk_choice():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 256, generator=gen)
    w_q, w_scales = make_weight(48, 256, gen)
    bias = torch.randn(48, generator=gen)
    for text in ("splitk 16x128/s2/w4/st2", "splitk 16x128/s2/w4/pf/mma"):
        choice = dispatch.GemmChoice.parse(text)
        y = fp8.fp8_linear(x, w_q, w_scales, bias, backend="triton", choice=choice)
        assert relative_error(y, _expected(x, w_q, w_scales, bias)) < 2e-6, text


def test_config_text_round_trips_and_checks():
    for text in ("16x256/s4/w4/st3", "8x512/s3/w8/pf", "64x128/s8/w4/pf/mma"):
        config = SplitKConfig.parse(text)
        assert str(config) == text
        config.check()
        assert str(dispatch.GemmChoice.parse(f"splitk {text}")) == f"splitk {text}"
    for bad in ("16x256/s4/w4", "16x256/s4/w4/st3/dot", "16x256/s4/pf"):
        with pytest.raises(ValueError):
            SplitKConfig.parse(bad)
    for bad in (
        "16x64/s1/w4/pf",
        "8x128/s1/w4/pf/mma",
        "12x128/s1/w4/pf",
        "16x128/s0/w4/pf",
    ):
        with pytest.raises(ValueError):
            SplitKConfig.parse(bad).check()
    with pytest.raises(ValueError):
        SplitKConfig(16, 128, prefetch=True, num_stages=3).check()
    with pytest.raises(ValueError):
        dispatch.GemmChoice.parse("splitk")


def test_default_config_fills_the_sms_and_keeps_two_chunks_a_split():
    shapes = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (2560, 8192))
    shapes += ((8192, 2048), (8192, 7168))
    for m in (1, 2, 4, 5, 16, 64):
        for n, k in shapes:
            config = default_splitk_config(m, n, k, 132)
            config.check()
            assert config.mma == (m > FMA_MAX_TOKENS)
            tiles = -(-n // config.block_n)
            chunks = -(-k // config.block_k)
            assert chunks // config.split_k >= 2
            assert tiles * config.split_k >= PROGRAMS_PER_SM * 132 or (
                4 * config.split_k > chunks
            )


def test_the_launcher_refuses_what_the_kernels_do_not_take():
    from loraplex.kernels.fp8 import splitk

    gen = torch.Generator().manual_seed(5)
    w_q, w_scales = make_weight(32, 128, gen)
    fma, mma = SplitKConfig(16, 128), SplitKConfig(16, 128, mma=True)
    for x, config in (
        (torch.randn(FMA_MAX_TOKENS + 1, 128), fma),  # CUDA cores: 4 tokens at most
        (torch.randn(splitk.MAX_TOKENS + 1, 128), mma),
        (torch.randn(2, 64), fma),  # K unlike the weight's
        (torch.randn(128, 2).T, fma),  # x strided along K
    ):
        with pytest.raises(ValueError):
            splitk.fp8_splitk(x, w_q, w_scales, config)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled kernels"
)
def test_sweep_compiles_for_h100_without_spills(monkeypatch, tmp_path):
    """Every config bench_fp8.py sweeps, launched as on the GPU (bf16, down 4096x14336: K split
    at every token count) and compiled with Triton's ptxas for sm_90."""
    triton = pytest.importorskip("triton")
    from pathlib import Path

    if not (Path(triton.__path__[0]) / "backends/nvidia/bin/ptxas").exists():
        pytest.skip("this triton has no bundled ptxas")
    import test_attention_compile as compile_check

    from loraplex.kernels.fp8 import splitk

    monkeypatch.setitem(compile_check.TYPES, torch.float8_e4m3fn, "fp8e4nv")
    launches = compile_check._record_launches(monkeypatch, [splitk])
    meta = {"device": "meta"}
    n, k = 4096, 14336  # down: split K at every token count
    w_q = torch.empty(n, k, dtype=torch.float8_e4m3fn, **meta)
    w_scales = torch.empty(n, 1, dtype=torch.float32, **meta)
    swept = []
    for m in (1, 2, 4, 8, 16, 32, 64):
        x = torch.empty(m, k, dtype=torch.bfloat16, **meta)
        for config in sweep(m, n, k, 132):
            splitk.fp8_splitk(x, w_q, w_scales, config)
            swept.append(f"{config} M={m}")
    for (kernel, args, kwargs), label in zip(launches, swept, strict=True):
        compiled = compile_check._compile_for_sm90(kernel, args, kwargs)
        assert compiled.metadata.shared <= compile_check.H100_SHARED_BYTES, label
        spilled = compile_check._spilled_bytes(compiled.asm["cubin"], tmp_path)
        assert spilled in (0, None), label
