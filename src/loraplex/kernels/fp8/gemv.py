"""y[m, n] = s_w[n] · Σ_k x[m, k] · q_w[n, k] + b[n]: FP8 weights, x unquantized, fp32 sums.

The weight-only FP8 kernel for decode batches (up to 64 tokens), where a GEMM is a read of the
weight. The W8A8 path pays for that read twice: x is quantized in a launch of its own (or
re-read by every program), and cuBLASLt's FP8 tiles read the weight at 30-60% of copy bandwidth
at these sizes (benchmarks/bench_fp8.py on an H100, 2026-11-27). Here each program owns BLOCK_N
weight rows and streams them over all of K in BLOCK_K chunks, converting fp8 to x's dtype in
registers; x is read as is (no activation quantization, so this path is also a little more
exact than W8A8) and the per-channel weight scale is applied once at the end.

Two inner products, picked by the token count:
- up to GEMV_TOKENS tokens, a broadcast multiply and a sum over K on the CUDA cores (an MMA tile
  is at least 16 tokens wide: 15/16 of it would be padding);
- above, `tl.dot` on the tensor cores with the weight converted to x's dtype (16 to 64 tokens
  in one BLOCK_M tile).
BLOCK_N is small enough that the grid holds several programs per SM; there is no split-K and no
atomics: one launch, the same bits every run, graph-safe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..sgmv._launch import dot_precision
from ._launch import OUT_DTYPES, QUANT_DTYPES, kernel_for, next_pow2

GEMV_TOKENS = 4  # the broadcast product is [BLOCK_M, BLOCK_N, BLOCK_K] registers
MAX_TOKENS = 64  # one BLOCK_M tile of the tensor-core path


@dataclass(frozen=True)
class GemvConfig:
    """Tiles of one GEMV launch; written `8x512/st4` (BLOCK_N x BLOCK_K / num_stages)."""

    block_n: int
    block_k: int
    num_stages: int = 4
    num_warps: int = 4

    def __str__(self) -> str:
        return f"{self.block_n}x{self.block_k}/st{self.num_stages}"

    def check(self) -> None:
        """Tiles Triton takes: powers of two, BLOCK_N >= 4 and BLOCK_K >= 16."""
        for name, value, least in (
            ("block_n", self.block_n, 4),
            ("block_k", self.block_k, 16),
        ):
            if value < least or value & (value - 1):
                raise ValueError(
                    f"{name} must be a power of two >= {least}, got {value}"
                )
        if self.num_stages < 1 or self.num_warps < 1:
            raise ValueError(f"{self}: num_stages and num_warps must be >= 1")

    @classmethod
    def parse(cls, text: str) -> GemvConfig:
        match = re.fullmatch(r"(\d+)x(\d+)/st(\d+)", text.strip())
        if match is None:
            raise ValueError(f"GEMV config {text!r} is not like '8x512/st4'")
        return cls(*(int(g) for g in match.groups()))


def default_gemv_config(n: int, sms: int, num_tokens: int = 1) -> GemvConfig:
    """BLOCK_N as large as keeps 4 programs per SM (4 rows at least on the CUDA cores, 16 on
    the tensor cores, 32 at most); BLOCK_K 1024 bytes of a weight row on the CUDA cores, 256 on
    the tensor cores (the converted tile lives in registers)."""
    smallest = 4 if num_tokens <= GEMV_TOKENS else 16
    block_n = 32
    while block_n > smallest and triton.cdiv(n, block_n) < 4 * sms:
        block_n //= 2
    return GemvConfig(block_n, 1024 if num_tokens <= GEMV_TOKENS else 256)


@triton.jit
def fp8_gemv_kernel(
    x_ptr,
    w_ptr,
    w_scales_ptr,
    bias_ptr,
    y_ptr,
    num_tokens,
    out_features,
    in_features,
    stride_x_token,
    stride_w_row,
    stride_y_token,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_valid = offs_m < num_tokens
    n_valid = offs_n < out_features
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x_token  # [BLOCK_M, 1]
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w_row  # [BLOCK_N, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + offs_k
        if EVEN_K:
            w = tl.load(w_rows + k[None, :], mask=n_valid[:, None], other=0.0)
            x = tl.load(x_rows + k[None, :], mask=m_valid[:, None], other=0.0)
        else:
            k_valid = k < in_features
            w = tl.load(
                w_rows + k[None, :], mask=n_valid[:, None] & k_valid[None, :], other=0.0
            )
            x = tl.load(
                x_rows + k[None, :], mask=m_valid[:, None] & k_valid[None, :], other=0.0
            )
        if USE_DOT:
            w_t = tl.trans(w.to(x.dtype))  # [BLOCK_K, BLOCK_N]
            acc += tl.dot(x, w_t, input_precision=DOT_PRECISION)
        else:
            product = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
            acc += tl.sum(product, axis=2)
    acc *= tl.load(w_scales_ptr + offs_n, mask=n_valid, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[
            None, :
        ]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_y_token + offs_n[None, :]
    tl.store(
        y, acc.to(y_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :]
    )


def fp8_gemv(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scales: torch.Tensor,
    config: GemvConfig,
    *,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel: y [M, N] in x's dtype for M <= MAX_TOKENS (see the module docstring).

    :param x: [M, K] bf16/fp16/fp32, unit stride along K.
    :param weight_q: [N, K] float8_e4m3fn, unit stride along K.
    :param weight_scales: [N, 1] float32, contiguous.
    :param bias: optional [N] in x's dtype.
    :param out: optional [M, N] in x's dtype, contiguous (tests poison it).
    """
    num_tokens, in_features = x.shape
    out_features = weight_q.shape[0]
    if not 1 <= num_tokens <= MAX_TOKENS:
        raise ValueError(f"the kernel takes 1 to {MAX_TOKENS} tokens, got {num_tokens}")
    if x.dtype not in QUANT_DTYPES or x.dtype not in OUT_DTYPES or x.stride(1) != 1:
        raise ValueError("x must be bf16/fp16/fp32 with unit stride along features")
    if weight_q.dtype != torch.float8_e4m3fn or weight_q.shape[1] != in_features:
        raise ValueError(f"weight_q must be float8_e4m3fn [N, {in_features}]")
    if weight_q.stride(1) != 1 or weight_scales.shape != (out_features, 1):
        raise ValueError("weight_q needs unit stride along K; weight_scales [N, 1]")
    if out is None:
        out = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device)
    elif out.shape != (num_tokens, out_features) or not out.is_contiguous():
        raise ValueError(f"out must be contiguous [{num_tokens}, {out_features}]")
    use_dot = num_tokens > GEMV_TOKENS
    if use_dot and config.block_n < 16:
        raise ValueError(f"{config}: the tensor-core path needs BLOCK_N >= 16")
    grid = (triton.cdiv(out_features, config.block_n),)
    kernel_for(fp8_gemv_kernel, x)[grid](
        x,
        weight_q,
        weight_scales,
        bias if bias is not None else weight_scales,
        out,
        num_tokens,
        out_features,
        in_features,
        x.stride(0),
        weight_q.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        USE_DOT=use_dot,
        BLOCK_M=max(16, next_pow2(num_tokens)) if use_dot else next_pow2(num_tokens),
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        EVEN_K=in_features % config.block_k == 0,
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
