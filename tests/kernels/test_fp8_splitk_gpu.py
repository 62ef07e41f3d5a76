"""The split-K weight-only FP8 kernels on a CUDA GPU (pytest -m gpu) against float64.

bf16 at the Llama-3.1-8B linears and the 70B tensor-parallel shards (TP2, TP4), M = 1 to 64
tokens, every config bench_fp8.py sweeps, fresh random activations (one random weight a
shape), NaN-poisoned outputs; a CUDA graph captured once replays on inputs unlike the captured
ones, bit for bit what eager computes, and leaves every split-K counter at zero.
"""

from __future__ import annotations

import functools

import pytest
import torch
from fp8_cases import LLAMA_8B, make_weight, relative_error

from loraplex.kernels import fp8
from loraplex.kernels.fp8 import dispatch, gemm, splitk

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
TOKENS = (1, 2, 4, 8, 16, 32, 64)
# bf16 output rounding (2^-9 relative) over fp32 sums; the tensor-core path multiplies bf16 x
# by bf16-exact weights.
TOLERANCE = 5e-3
LLAMA_70B_SHARDS = (
    ("tp2_qkv", 5120, 8192),
    ("tp2_o", 8192, 4096),
    ("tp2_gate_up", 28672, 8192),
    ("tp2_down", 8192, 14336),
    ("tp4_qkv", 2560, 8192),
    ("tp4_o", 8192, 2048),
    ("tp4_gate_up", 14336, 8192),
    ("tp4_down", 8192, 7168),
)
SHAPES = LLAMA_8B + LLAMA_70B_SHARDS


def _sms() -> int:
    return torch.cuda.get_device_properties(CUDA).multi_processor_count


@functools.cache  # one weight a shape: drawing a 28672x8192 weight on the host takes seconds
def _weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return make_weight(n, k, torch.Generator().manual_seed(n + k), device=CUDA)


def _inputs(m: int, n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w_q, w_scales = _weight(n, k)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-1, 1, m)[:, None]
    bias = torch.randn(n, generator=gen).to(torch.bfloat16).to(CUDA)
    return x.to(torch.bfloat16).to(CUDA), w_q, w_scales, bias


def _expected(x, w_q, w_scales, bias=None):
    y = x.double() @ (w_q.double() * w_scales.double()).T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_every_swept_config_against_float64(shape, m):
    _, n, k = shape
    x, w_q, w_scales, bias = _inputs(m, n, k, seed=m * 13 + n + k)
    expected = _expected(x, w_q, w_scales)
    for config in splitk.sweep(m, n, k, _sms()):
        y = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=CUDA)
        splitk.fp8_splitk(x, w_q, w_scales, config, out=y)
        assert torch.isfinite(y).all(), f"{config}: an entry of y was never written"
        assert relative_error(y, expected) < TOLERANCE, str(config)
    config = splitk.default_splitk_config(m, n, k, _sms())
    y = splitk.fp8_splitk(x, w_q, w_scales, config, bias=bias)
    assert relative_error(y, _expected(x, w_q, w_scales, bias)) < TOLERANCE, "bias"
    assert not gemm.split_counters(CUDA).any(), "a split-K counter was left non-zero"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_activation_dtypes(dtype):
    n, k = 4096, 4096
    for m in (1, 3, 17, 64):
        x, w_q, w_scales, bias = _inputs(m, n, k, seed=m)
        x, bias = x.to(dtype), bias.to(dtype)
        expected = _expected(x, w_q, w_scales, bias)
        for config in splitk.sweep(m, n, k, _sms())[:3]:
            y = splitk.fp8_splitk(x, w_q, w_scales, config, bias=bias)
            assert y.dtype == dtype
            tolerance = 1e-5 if dtype == torch.float32 else 2e-3
            assert relative_error(y, expected) < tolerance, str(config)


@pytest.mark.parametrize("m", [1, 4, 8, 64])
@pytest.mark.parametrize(
    "shape", [LLAMA_8B[3], LLAMA_70B_SHARDS[5]], ids=["down", "tp4_o"]
)
def test_cuda_graph_replays_fresh_inputs_bit_for_bit(shape, m):
    _, n, k = shape
    static_x, w_q, w_scales, bias = _inputs(m, n, k, seed=7 * m)
    fp8.reserve_workspace(CUDA)
    for config in splitk.sweep(m, n, k, _sms())[
        :3
    ]:  # the default, twice its split, prefetch
        choice = dispatch.GemmChoice("splitk", config)
        fp8.fp8_linear(
            static_x, w_q, w_scales, bias, choice=choice
        )  # compile before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = fp8.fp8_linear(static_x, w_q, w_scales, bias, choice=choice)
        for seed in range(
            3
        ):  # inputs unlike the captured ones, through the same buffer
            fresh, _, _, _ = _inputs(m, n, k, seed=1000 + seed)
            static_x.copy_(fresh)
            static_y.fill_(float("nan"))
            graph.replay()
            eager = fp8.fp8_linear(fresh, w_q, w_scales, bias, choice=choice)
            torch.cuda.synchronize()
            assert torch.equal(static_y, eager), str(config)
            expected = _expected(fresh, w_q, w_scales, bias)
            assert relative_error(static_y, expected) < TOLERANCE, str(config)
        del graph
    assert not gemm.split_counters(CUDA).any()
