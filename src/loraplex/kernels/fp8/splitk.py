"""y[m, n] = s_w[n] · Σ_splits Σ_{k in split} x[m, k] · q_w[n, k] + b[n]: FP8 weights, x unquantized.

The weight-only FP8 linear of gemv.py, rebuilt for memory-level parallelism at decode sizes (1 to
64 tokens), where a linear is a read of its weight. gemv.py read qkv (6144x4096) at 45% of copy
bandwidth for one token on an H100 (benchmarks/results/bench_fp8-h100-2026-11-27.json), and
compiled for sm_90 its CUDA-core loop moves every weight chunk through shared memory (its 3-D
product's layout is not the 16-byte load layout; `ttg.convert_layout` of the weight tile and
bar.syncs in the loop), with one chunk in flight per program and, for N = 4096, too few programs
to fill 132 SMs. Full bandwidth wants ~20-40 KB of loads in flight per SM. Here:

- split-K: grid (N / BLOCK_N, SPLIT_K); each program streams one K range of its BLOCK_N rows, so
  N = 2048..8192 still gives every SM several programs. The splits are joined in the same
  launch, as gemm.py does: each stores its fp32 partial tile and bumps the tile's counter (gemm.py's
  `split_counters`, made before any CUDA graph capture by `reserve_workspace`); the last to arrive
  adds the partials in split order, scales, adds the bias, writes y and resets the counter.
  Deterministic (the same bits whatever order the splits finish in), no zero fill, no second
  launch, nothing waits on the host; the [SPLIT_K, M, N] fp32 partials come from torch.empty in
  the launcher (the graph's private pool under capture). fp32 atomic adds into a zeroed
  workspace were the other choice: one pass less over the partials, but the order of the adds,
  and so the bits, would change from run to run, and the zero fill is one more launch.
- 16-byte loads: BLOCK_K >= 128 fp8, and where BLOCK_K divides K the K mask is one scalar per
  chunk (EVEN_K), so each thread reads 16 contiguous bytes of a row at once.
- several chunks in flight: `stN` lets Triton's pipeliner run the loop with N stages (on sm_90
  it turns the loads into cp.async copies to shared memory, N - 1 chunks ahead); `pf` issues the
  next chunk's loads by hand before this chunk's products (register double buffering, as
  sgmv/expand_blocks.py does; it won 1.3-1.9x there). Which wins is for the GPU to say.

Two products, named by the config (`/mma` or not), never picked by the token count:
- CUDA cores, up to FMA_MAX_TOKENS tokens: one fp32 [BLOCK_N, BLOCK_K] accumulator per token in
  the weight's own load layout, so the loop has no layout change and no shuffle: each weight
  byte costs a conversion and one FMA per token; the sum over K happens once, after the loop.
- tensor cores (`mma`), 1 to 64 tokens in one BLOCK_M >= 16 tile: yᵀ[BLOCK_N, BLOCK_M] +=
  W[BLOCK_N, BLOCK_K] · xᵀ with W converted to x's dtype in registers (swap AB, as gemm.py:
  weight rows on the MMA's wide side, the few tokens on its narrow side).
x is read as is (no activation quantization) and the per-channel scale is applied once, last;
the spec is `reference.fp8_gemv_reference`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import triton

from ..sgmv._launch import dot_precision
from ._launch import OUT_DTYPES, QUANT_DTYPES, kernel_for, next_pow2
from .gemm import NUM_COUNTERS, split_counters
from .splitk_kernels import fp8_splitk_fma_kernel, fp8_splitk_mma_kernel

FMA_MAX_TOKENS = 4  # one accumulator tile per token on the CUDA cores; more take `mma`
MAX_TOKENS = 64  # one BLOCK_M tile of the tensor-core path
PROGRAMS_PER_SM = 4  # what `default_splitk_config` splits K for; a guess until measured

_CONFIG_FORM = re.compile(r"(\d+)x(\d+)/s(\d+)/w(\d+)/(pf|st(\d+))(/mma)?")


@dataclass(frozen=True)
class SplitKConfig:
    """Tiles of one split-K launch; written `16x512/s4/w4/pf` (BLOCK_N x BLOCK_K / splits /
    warps / `pf`: prefetch by hand, or `stN`: Triton's pipeliner with N stages), `/mma` last
    for the tensor-core product."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    prefetch: bool = True
    num_stages: int = 1  # 1 with prefetch (the prefetch is the pipeline)
    mma: bool = False

    def __str__(self) -> str:
        pipeline = "pf" if self.prefetch else f"st{self.num_stages}"
        text = f"{self.block_n}x{self.block_k}/s{self.split_k}/w{self.num_warps}/{pipeline}"
        return text + ("/mma" if self.mma else "")

    @classmethod
    def parse(cls, text: str) -> SplitKConfig:
        match = _CONFIG_FORM.fullmatch(text.strip())
        if match is None:
            raise ValueError(
                f"split-K config {text!r} is not like '16x512/s4/w4/pf[/mma]'"
            )
        block_n, block_k, split_k, num_warps, pipeline, stages, mma = match.groups()
        return cls(
            int(block_n),
            int(block_k),
            int(split_k),
            int(num_warps),
            prefetch=pipeline == "pf",
            num_stages=1 if stages is None else int(stages),
            mma=mma is not None,
        )

    def check(self) -> None:
        """Tiles in powers of two (any split); BLOCK_K >= 128 (16-byte loads, whole 128-byte
        rows); `mma` tiles need BLOCK_N >= 16 (tl.dot's least side)."""
        for name, value, least in (
            ("block_n", self.block_n, 16 if self.mma else 1),
            ("block_k", self.block_k, 128),
            ("num_warps", self.num_warps, 1),
        ):
            if value < least or value & (value - 1):
                raise ValueError(f"{self}: {name} must be a power of two >= {least}")
        if self.split_k < 1:
            raise ValueError(f"{self}: split_k must be >= 1")
        if self.num_stages < 1 or (self.prefetch and self.num_stages != 1):
            raise ValueError(
                f"{self}: prefetch runs one compiler stage; stN needs N >= 1"
            )


def split_for(n: int, k: int, block_n: int, block_k: int, sms: int, per_sm: int) -> int:
    """K splits, a power of two: the fewest that give `per_sm` programs per SM, keeping two
    chunks of K a split at least."""
    tiles, k_chunks = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    split_k = 1
    while tiles * split_k < per_sm * sms and 4 * split_k <= k_chunks:
        split_k *= 2
    return split_k


def default_splitk_config(m: int, n: int, k: int, sms: int) -> SplitKConfig:
    """For shapes without a measured entry (guesses until measured). CUDA cores up to 4
    tokens: 16 rows x 256 bytes for 1-2 tokens, 8 x 256 for 3-4 (the accumulators hold 32 and
    16 fp32 a thread a token at 4 warps); tensor cores above: 64 rows x 128 bytes (one 64-row
    MMA). Three pipeline stages; K split for PROGRAMS_PER_SM programs per SM."""
    mma = m > FMA_MAX_TOKENS
    block_n, block_k = (64, 128) if mma else (16 if m <= 2 else 8, 256)
    split_k = split_for(n, k, block_n, block_k, sms, PROGRAMS_PER_SM)
    return SplitKConfig(
        block_n, block_k, split_k, prefetch=False, num_stages=3, mma=mma
    )


def sweep(m: int, n: int, k: int, sms: int) -> list[SplitKConfig]:
    """What benchmarks/bench_fp8.py times for M tokens of an [N, K] weight (and what the sm_90
    compile test holds to no spills): the default first; twice its split; hand prefetch
    instead of the pipeliner; other tile shapes (each with its own split); and past the
    CUDA-core tokens, the tensor cores for comparison."""
    base = default_splitk_config(m, n, k, sms)

    def tile(
        block_n, block_k, prefetch=False, stages=3, warps=4, mma=base.mma, per_sm=4
    ):
        split_k = split_for(n, k, block_n, block_k, sms, per_sm)
        stages = 1 if prefetch else stages
        return SplitKConfig(block_n, block_k, split_k, warps, prefetch, stages, mma)

    bn, bk = base.block_n, base.block_k
    configs = [base, tile(bn, bk, per_sm=8), tile(bn, bk, prefetch=True)]
    if not base.mma:
        configs += [tile(bn // 2, 2 * bk), tile(2 * bn, bk // 2, stages=4)]
        configs.append(tile(64, 128, mma=True))
    else:
        configs += [tile(32, 256), tile(64, 128, stages=4), tile(128, 128, warps=8)]
    return configs


def fp8_splitk(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scales: torch.Tensor,
    config: SplitKConfig,
    *,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel: y [M, N] in x's dtype (see the module docstring).

    :param x: [M, K] bf16/fp16/fp32, unit stride along K; M <= FMA_MAX_TOKENS on the CUDA
        cores, M <= MAX_TOKENS with `mma`.
    :param weight_q: [N, K] float8_e4m3fn, unit stride along K.
    :param weight_scales: [N, 1] float32, contiguous.
    :param config: tiles and split (the dispatch table's, or a benchmark's sweep).
    :param bias: optional [N] in x's dtype, contiguous.
    :param out: optional [M, N] in x's dtype, contiguous (tests poison it).
    """
    num_tokens, in_features = x.shape
    out_features = weight_q.shape[0]
    most = MAX_TOKENS if config.mma else FMA_MAX_TOKENS
    if not 1 <= num_tokens <= most:
        raise ValueError(f"{config} takes 1 to {most} tokens, got {num_tokens}")
    if x.dtype not in QUANT_DTYPES or x.dtype not in OUT_DTYPES or x.stride(1) != 1:
        raise ValueError("x must be bf16/fp16/fp32 with unit stride along features")
    if weight_q.dtype != torch.float8_e4m3fn or weight_q.shape[1] != in_features:
        raise ValueError(f"weight_q must be float8_e4m3fn [N, {in_features}]")
    if weight_q.stride(1) != 1 or weight_scales.shape != (out_features, 1):
        raise ValueError("weight_q needs unit stride along K; weight_scales [N, 1]")
    if bias is not None and (bias.shape != (out_features,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{out_features}]")
    config.check()
    if out is None:
        out = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device)
    elif out.shape != (num_tokens, out_features) or not out.is_contiguous():
        raise ValueError(f"out must be contiguous [{num_tokens}, {out_features}]")
    k_chunks = triton.cdiv(in_features, config.block_k)
    k_per_split = triton.cdiv(k_chunks, min(config.split_k, k_chunks)) * config.block_k
    split_k = triton.cdiv(
        in_features, k_per_split
    )  # no split without a chunk of its own
    tiles = triton.cdiv(out_features, config.block_n)
    partials, counters = out, out  # unread without a split
    if split_k > 1:
        if tiles > NUM_COUNTERS:
            raise ValueError(f"split-K takes at most {NUM_COUNTERS} tiles, not {tiles}")
        partials = torch.empty(
            split_k, num_tokens, out_features, dtype=torch.float32, device=x.device
        )
        counters = split_counters(x.device)
    block_m = next_pow2(num_tokens)
    options = {}
    if config.mma:
        kernel, block_m = fp8_splitk_mma_kernel, max(16, block_m)
        options["DOT_PRECISION"] = dot_precision(x.dtype)
    else:
        kernel = fp8_splitk_fma_kernel
    kernel_for(kernel, x)[(tiles, split_k)](
        x,
        weight_q,
        weight_scales,
        weight_scales if bias is None else bias,  # unread without a bias
        out,
        partials,
        counters,
        num_tokens,
        out_features,
        in_features,
        k_per_split,
        split_k,
        x.stride(0),
        weight_q.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        SPLIT=split_k > 1,
        BLOCK_M=block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        EVEN_K=in_features % config.block_k == 0,
        PREFETCH=config.prefetch,
        NUM_STAGES=config.num_stages,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **options,
    )
    return out
