"""y[m, n] = s_x[m] · s_w[n] · Σ_k q_x[m, k] · q_w[n, k] + b[n], accumulated in fp32.

The Triton FP8 GEMM for small M (decode), where a GEMM is a read of the weight. Each program
computes the transposed tile yᵀ[BLOCK_N, BLOCK_M] = W[BLOCK_N, :] · xᵀ (swap AB: the weight rows
fill the MMA's wide side, the few tokens its narrow side; both operands stay K-major as FP8 MMAs
want) over one split of K. Programs are ordered token tile first, so the programs that share a
weight tile run together and read it from HBM once.

Too few weight tiles to fill the GPU (o and down at decode) split K: each split stores its
partial tile and bumps a per-tile counter; the last split to arrive adds the partials in split
order, applies the scales (and bias) and writes y, then resets the counter for the next launch.
One launch, no zero fill, the same bits on every run, nothing that waits on the host: CUDA-graph
safe once the counters exist (the first launch on a device makes them; warm up before capture).
Partial sums move from the MMA's accumulator to fp32 every PROMOTE_EVERY elements of K.

QUANT_X (the fused variant) takes bf16/fp16/fp32 x and quantizes it per token inside: each
program first reads its tokens' whole rows for their absmax (from L2), then casts each K block
as it streams, exactly as `quantize_per_token` would. It saves a launch and pays a re-read of x
per program: worth it only for a handful of tokens; the dispatch table decides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import FP8_MAX, MIN_SCALE, OUT_DTYPES, QUANT_DTYPES, kernel_for

NUM_COUNTERS = 8192  # tiles a split-K launch may have
# Hopper's FP8 MMA adds products at reduced precision (about 14 bits kept: DeepSeek-V3's
# report); Triton's default there never moves the sum to fp32. Promote every 128 K elements, as
# DeepSeek-V3 does (a few adds per K block: free in a memory-bound GEMM).
PROMOTE_EVERY = 128
_counters: dict[torch.device, torch.Tensor] = {}


@triton.jit
def fp8_gemm_kernel(
    x_ptr,
    x_scales_ptr,
    w_ptr,
    w_scales_ptr,
    bias_ptr,
    y_ptr,
    partials_ptr,
    counters_ptr,
    num_tokens,
    out_features,
    in_features,
    k_per_split,
    stride_x_token,
    stride_w_row,
    stride_y_token,
    stride_partials_split,
    QUANT_X: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    PROMOTE_EVERY: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_valid = offs_m < num_tokens
    n_valid = offs_n < out_features
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x_token  # [BLOCK_M, 1]
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w_row  # [BLOCK_N, 1]

    if QUANT_X:  # the absmax of each token's whole row, before any K block is cast
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k in range(0, in_features, BLOCK_K):
            mask = m_valid[:, None] & (k + offs_k < in_features)[None, :]
            x = tl.load(x_rows + k + offs_k[None, :], mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        x_scales = tl.maximum(tl.math.div_rn(amax, FP8_MAX), MIN_SCALE)
    else:
        x_scales = tl.load(x_scales_ptr + offs_m, mask=m_valid, other=0.0)

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            x_mask = m_valid[:, None]
            w_mask = n_valid[:, None]
        else:
            k_valid = (k + offs_k < in_features)[None, :]
            x_mask = m_valid[:, None] & k_valid
            w_mask = n_valid[:, None] & k_valid
        w = tl.load(w_rows + k + offs_k[None, :], mask=w_mask, other=0.0)
        x = tl.load(x_rows + k + offs_k[None, :], mask=x_mask, other=0.0)
        if QUANT_X:
            x = tl.math.div_rn(x.to(tl.float32), x_scales[:, None])
            x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX).to(w.dtype)
        acc = tl.dot(w, tl.trans(x), acc, max_num_imprecise_acc=PROMOTE_EVERY)

    # y[m, n] lives at column n of row m: the tile is [BLOCK_N, BLOCK_M], n along dim 0.
    tile = offs_m.to(tl.int64)[None, :] * stride_y_token + offs_n[:, None]
    out_mask = n_valid[:, None] & m_valid[None, :]
    w_scales = tl.load(w_scales_ptr + offs_n, mask=n_valid, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if SPLIT_K == 1:
        y = acc * w_scales[:, None] * x_scales[None, :] + bias[:, None]
        tl.store(y_ptr + tile, y.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        partial_tile = offs_m.to(tl.int64)[None, :] * out_features + offs_n[:, None]
        tl.store(
            partials_ptr + pid_k * stride_partials_split + partial_tile,
            acc,
            mask=out_mask,
        )
        tl.debug_barrier()  # every thread's partial is stored before the release below
        counter = counters_ptr + pid_n * tl.num_programs(0) + pid_m
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last split: every partial is visible now
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):
                total += tl.load(
                    partials_ptr + split * stride_partials_split + partial_tile,
                    mask=out_mask,
                    other=0.0,
                    cache_modifier=".cg",  # written by other SMs: read from L2
                )
            y = total * w_scales[:, None] * x_scales[None, :] + bias[:, None]
            tl.store(y_ptr + tile, y.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


_CONFIG_FORM = re.compile(r"^(\d+)x(\d+)x(\d+)/s(\d+)/w(\d+)/st(\d+)$")


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch options of one FP8 GEMM launch.

    Written `BMxBNxBK/sSPLIT/wWARPS/stSTAGES` in the dispatch table, e.g. `16x64x256/s4/w4/st4`.
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4

    def __str__(self) -> str:
        return (
            f"{self.block_m}x{self.block_n}x{self.block_k}/s{self.split_k}"
            f"/w{self.num_warps}/st{self.num_stages}"
        )

    @classmethod
    def parse(cls, text: str) -> GemmConfig:
        match = _CONFIG_FORM.match(text)
        if not match:
            raise ValueError(f"GEMM config {text!r} is not BMxBNxBK/sS/wW/stT")
        return cls(*(int(g) for g in match.groups()))

    def check(self) -> None:
        pow2 = (self.block_m, self.block_n, self.block_k, self.split_k, self.num_warps)
        if any(v < 1 or v & (v - 1) for v in pow2) or self.num_stages < 1:
            raise ValueError(f"GEMM config {self}: sizes must be powers of two")
        if min(self.block_m, self.block_n) < 16 or self.block_k < 32:
            raise ValueError(f"GEMM config {self}: tiles need 16x16x32 at least")


def split_counters(device: torch.device) -> torch.Tensor:
    """The split-K tile counters of `device` ([NUM_COUNTERS] int32, zero between launches).

    Made by the first launch on the device, which must not be inside a CUDA graph capture.
    """
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    counters = _counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "the FP8 GEMM's split-K counters are made on first use: run one eager "
                "forward (warm-up) before capturing a CUDA graph"
            )
        counters = torch.zeros(NUM_COUNTERS, dtype=torch.int32, device=device)
        _counters[device] = counters
    return counters


def _check(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    if x.dim() != 2 or weight_q.dim() != 2 or x.shape[1] != weight_q.shape[1]:
        raise ValueError(
            f"expected x [M, K] and weight_q [N, K], got {tuple(x.shape)} and "
            f"{tuple(weight_q.shape)}"
        )
    if weight_q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"weight_q must be float8_e4m3fn, got {weight_q.dtype}")
    n = weight_q.shape[0]
    if weight_scales.shape != (n, 1) or weight_scales.dtype != torch.float32:
        raise ValueError(f"weight_scales must be [{n}, 1] float32")
    if x.stride(1) != 1 or weight_q.stride(1) != 1 or not weight_scales.is_contiguous():
        raise ValueError("x and weight_q need unit stride along K; scales contiguous")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}]")
    tensors = (x, weight_q, weight_scales) + (() if bias is None else (bias,))
    if len({t.device for t in tensors}) != 1:
        raise ValueError("x, weight_q, weight_scales and bias must share one device")


def fp8_gemm(
    x: torch.Tensor,
    x_scales: torch.Tensor | None,
    weight_q: torch.Tensor,
    weight_scales: torch.Tensor,
    config: GemmConfig,
    *,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the FP8 GEMM; returns y [M, N] out_dtype (see the module docstring).

    :param x: [M, K], unit stride along K: float8_e4m3fn with `x_scales`, or bf16/fp16/fp32
        with `x_scales=None` (the fused variant quantizes it per token).
    :param x_scales: [M, 1] float32 per-token scales of a quantized x, or None.
    :param weight_q: [N, K] float8_e4m3fn, unit stride along K.
    :param weight_scales: [N, 1] float32 per-output-channel scales.
    :param config: tile shape and split (from the dispatch table, or a benchmark's sweep).
    :param bias: optional [N] added after scaling.
    :param out: optional [M, N] out_dtype to write into (tests poison it).
    """
    _check(x, weight_q, weight_scales, bias)
    quant_x = x_scales is None
    if quant_x and x.dtype not in QUANT_DTYPES:
        raise TypeError(f"the fused GEMM takes bf16/fp16/fp32 x, got {x.dtype}")
    if not quant_x and (
        x.dtype != torch.float8_e4m3fn
        or x_scales.shape != (x.shape[0], 1)
        or x_scales.dtype != torch.float32
        or not x_scales.is_contiguous()
    ):
        raise ValueError("a quantized x is float8_e4m3fn with [M, 1] float32 scales")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be bf16, fp16 or fp32, got {out_dtype}")
    config.check()
    (m, k), n = x.shape, weight_q.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != out_dtype or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {n}] {out_dtype} with unit stride")
    if m == 0:
        return out
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), 1)
    k_steps = triton.cdiv(k, config.block_k)
    split_k = min(config.split_k, k_steps)
    k_per_split = triton.cdiv(k_steps, split_k) * config.block_k
    split_k = triton.cdiv(k, k_per_split)  # no split without a K block of its own
    partials, counters = out, out
    if split_k > 1:
        if grid[0] * grid[1] > NUM_COUNTERS:
            raise ValueError(f"split-K takes at most {NUM_COUNTERS} tiles, not {grid}")
        partials = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
        counters = split_counters(x.device)
    kernel_for(fp8_gemm_kernel, x)[(grid[0], grid[1], split_k)](
        x,
        weight_scales if quant_x else x_scales,  # unread when QUANT_X
        weight_q,
        weight_scales,
        weight_scales if bias is None else bias,  # unread without a bias
        out,
        partials,
        counters,
        m,
        n,
        k,
        k_per_split,
        x.stride(0),
        weight_q.stride(0),
        out.stride(0),
        partials.stride(0) if split_k > 1 else 0,
        QUANT_X=quant_x,
        HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        SPLIT_K=split_k,
        EVEN_K=k % config.block_k == 0,
        PROMOTE_EVERY=min(config.block_k, PROMOTE_EVERY),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
