"""impl(M, N, K) = TABLE[capability][(N, K)][bucket(M)], else the heuristic `default_choice`.

The one place that decides which FP8 GEMM runs a linear: `torch._scaled_mm` (cuBLASLt, row-wise
scales), the Triton kernel of gemm.py, quantizing x in a launch of its own ("triton") or
inside the GEMM ("triton_fused"), or a weight-only kernel ("gemv": gemv.py, "splitk":
splitk.py), and with which tiles. Decided by host ints only (shapes, dtype,
device), so a CUDA graph captured for one batch size always replays the same kernels.

Rules before the table: `_scaled_mm` with row-wise scales is used only for bf16 output and N, K
multiples of 16 (what it takes everywhere); other GEMMs always run in Triton. M above the last
bucket is prefill: `_scaled_mm`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import triton

from ._launch import num_sms
from .gemm import GemmConfig
from .gemv import GEMV_TOKENS, GemvConfig, default_gemv_config
from .splitk import SplitKConfig

Impl = Literal["scaled_mm", "triton", "triton_fused", "gemv", "splitk"]
IMPLS = ("scaled_mm", "triton", "triton_fused", "gemv", "splitk")
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class GemmChoice:
    """What runs one FP8 linear; written `scaled_mm`, `triton 16x64x256/s4/w4/st4`,
    `gemv 8x512/st4` or `splitk 16x256/s4/w4/st3[/mma]` (splitk.py)."""

    impl: Impl
    config: GemmConfig | GemvConfig | SplitKConfig | None = None

    def __str__(self) -> str:
        return self.impl if self.config is None else f"{self.impl} {self.config}"

    @classmethod
    def parse(cls, text: str) -> GemmChoice:
        impl, _, config = text.strip().partition(" ")
        if impl not in IMPLS or (impl == "scaled_mm") != (not config):
            raise ValueError(
                f"dispatch entry {text!r}: 'scaled_mm', 'triton[_fused] <config>' or "
                "'gemv <config>' or 'splitk <config>'"
            )
        if impl == "gemv":
            return cls(impl, GemvConfig.parse(config))
        if impl == "splitk":
            return cls(impl, SplitKConfig.parse(config))
        return cls(impl, GemmConfig.parse(config) if config else None)


SCALED_MM = GemmChoice("scaled_mm")

# capability → (N, K) → {M bucket: choice}: the Llama-3.1-8B linears (qkv 4096→6144, o
# 4096→4096, gate_up 4096→28672, down 14336→4096) on Hopper (H100 and H200 share sm_90 and 132
# SMs). The fastest of `_scaled_mm`, the Triton W8A8 tiles, the weight-only kernels of gemv.py
# and splitk.py per bucket, each timed replayed in a CUDA graph (what the engine runs) with the
# weights rotated past L2, by `benchmarks/bench_fp8.py --quick --shapes 8b` on an H200
# (2026-11-27, commit ba4ecf8; benchmarks/results/bench_fp8-h200-2026-11-27.json). Buckets
# 128 and 256 are eager timings (no graph holds them).
TABLE: dict[tuple[int, int], dict[tuple[int, int], dict[int, str]]] = {
    (9, 0): {
        (6144, 4096): {  # qkv
            1: "splitk 8x512/s1/w4/st3",  # 9.6 µs graph, 62% of copy
            2: "splitk 8x512/s1/w4/st3",  # 12.7 µs graph, 47% of copy
            4: "splitk 64x128/s8/w4/st3/mma",  # 14.8 µs graph, 40% of copy
            8: "splitk 64x128/s8/w4/st3/mma",  # 14.8 µs graph, 40% of copy
            16: "gemv 32x256/st4",  # 15.7 µs graph, 38% of copy
            32: "scaled_mm",  # 17.5 µs graph, 34% of copy
            64: "scaled_mm",  # 16.6 µs graph, 36% of copy
            128: "scaled_mm",  # 123.6 µs eager, 5% of copy
            256: "scaled_mm",  # 114.7 µs eager, 5% of copy
        },
        (4096, 4096): {  # o
            1: "splitk 8x512/s2/w4/st3",  # 9.7 µs graph, 41% of copy
            2: "splitk 8x512/s2/w4/st3",  # 11.4 µs graph, 35% of copy
            4: "splitk 64x128/s16/w4/st3/mma",  # 12.4 µs graph, 32% of copy
            8: "gemv 32x256/st4",  # 12.4 µs graph, 32% of copy
            16: "gemv 32x256/st4",  # 12.3 µs graph, 32% of copy
            32: "gemv 16x256/st4",  # 15.1 µs graph, 26% of copy
            64: "scaled_mm",  # 15.9 µs graph, 25% of copy
            128: "scaled_mm",  # 91.2 µs eager, 4% of copy
            256: "scaled_mm",  # 127.7 µs eager, 3% of copy
        },
        (28672, 4096): {  # gate_up
            1: "splitk 16x256/s1/w4/st3",  # 32.0 µs graph, 87% of copy
            2: "triton 16x64x256/s1/w4/st4",  # 35.4 µs graph, 78% of copy
            4: "triton 16x64x256/s1/w4/st4",  # 35.7 µs graph, 77% of copy
            8: "triton 16x64x256/s1/w4/st4",  # 35.8 µs graph, 77% of copy
            16: "triton 16x64x256/s1/w4/st4",  # 36.3 µs graph, 76% of copy
            32: "triton 32x64x256/s1/w4/st4",  # 37.4 µs graph, 74% of copy
            64: "triton 64x64x128/s1/w4/st4",  # 44.7 µs graph, 62% of copy
            128: "scaled_mm",  # 48.1 µs eager, 58% of copy
            256: "scaled_mm",  # 159.5 µs eager, 17% of copy
        },
        (4096, 14336): {  # down
            1: "splitk 16x256/s8/w4/st3",  # 22.8 µs graph, 61% of copy
            2: "splitk 16x256/s4/w4/st3",  # 25.1 µs graph, 55% of copy
            4: "triton 16x64x256/s8/w4/st4",  # 27.1 µs graph, 51% of copy
            8: "triton 16x64x256/s8/w4/st4",  # 27.2 µs graph, 51% of copy
            16: "triton 16x64x256/s8/w4/st4",  # 27.7 µs graph, 50% of copy
            32: "triton 32x64x256/s8/w4/st4",  # 30.1 µs graph, 46% of copy
            64: "triton 64x64x128/s8/w4/st4",  # 37.5 µs graph, 37% of copy
            128: "scaled_mm",  # 113.2 µs eager, 12% of copy
            256: "scaled_mm",  # 84.4 µs eager, 16% of copy
        },
        # The Llama-3.1-70B shards of tensor parallelism 2 and 4 (q/k/v and gate/up split by
        # output, o and down by input), `bench_fp8.py --quick --shapes 70b` on an H100
        # (2026-11-28, commit fbe19b0; benchmarks/results/fp8_70b-h100-2026-11-28-fbe19b0/).
        (5120, 8192): {  # tp2_qkv
            1: "splitk 8x512/s1/w4/st3",  # 18.2 µs graph, 77% of copy
            2: "splitk 8x512/s1/w4/st3",  # 22.7 µs graph, 62% of copy
            4: "splitk 64x128/s8/w4/st3/mma",  # 23.1 µs graph, 61% of copy
            8: "splitk 64x128/s8/w4/st3/mma",  # 23.2 µs graph, 60% of copy
            16: "splitk 64x128/s8/w4/st3/mma",  # 24.6 µs graph, 57% of copy
            32: "splitk 64x128/s8/w4/st3/mma",  # 26.6 µs graph, 53% of copy
            64: "scaled_mm",  # 28.4 µs graph, 49% of copy
            128: "scaled_mm",  # 65.7 µs eager, 21% of copy
            256: "scaled_mm",  # 138.2 µs eager, 10% of copy
        },
        (8192, 4096): {  # tp2_o
            1: "gemv 8x1024/st4",  # 16.3 µs graph, 69% of copy
            2: "splitk 8x512/s1/w4/st3",  # 16.6 µs graph, 68% of copy
            4: "splitk 64x128/s8/w4/st3/mma",  # 20.2 µs graph, 56% of copy
            8: "splitk 64x128/s8/w4/st3/mma",  # 20.1 µs graph, 56% of copy
            16: "triton 16x64x256/s4/w4/st4",  # 21.2 µs graph, 53% of copy
            32: "scaled_mm",  # 22.7 µs graph, 49% of copy
            64: "scaled_mm",  # 20.8 µs graph, 54% of copy
            128: "scaled_mm",  # 79.4 µs eager, 14% of copy
            256: "scaled_mm",  # 77.4 µs eager, 14% of copy
        },
        (28672, 8192): {  # tp2_gate_up
            1: "splitk 8x512/s1/w4/st3",  # 80.8 µs graph, 97% of copy
            2: "triton 16x64x256/s1/w4/st4",  # 86.1 µs graph, 91% of copy
            4: "triton 16x64x256/s1/w4/st4",  # 86.3 µs graph, 91% of copy
            8: "triton 16x64x256/s1/w4/st4",  # 86.8 µs graph, 90% of copy
            16: "triton 16x64x256/s1/w4/st4",  # 87.3 µs graph, 90% of copy
            32: "triton 32x64x256/s1/w4/st4",  # 88.9 µs graph, 88% of copy
            64: "scaled_mm",  # 102.3 µs graph, 77% of copy
            128: "scaled_mm",  # 106.8 µs eager, 73% of copy
            256: "scaled_mm",  # 133.4 µs eager, 59% of copy
        },
        (8192, 14336): {  # tp2_down
            1: "gemv 8x1024/st4",  # 48.0 µs graph, 82% of copy
            2: "splitk 8x512/s1/w4/st3",  # 46.1 µs graph, 85% of copy
            4: "triton 16x64x256/s4/w4/st4",  # 51.6 µs graph, 76% of copy
            8: "triton 16x64x256/s4/w4/st4",  # 52.1 µs graph, 75% of copy
            16: "triton 16x64x256/s4/w4/st4",  # 52.8 µs graph, 74% of copy
            32: "triton 32x64x256/s4/w4/st4",  # 55.4 µs graph, 71% of copy
            64: "scaled_mm",  # 58.7 µs graph, 67% of copy
            128: "scaled_mm",  # 95.2 µs eager, 41% of copy
            256: "scaled_mm",  # 103.8 µs eager, 38% of copy
        },
        (2560, 8192): {  # tp4_qkv
            1: "splitk 8x512/s2/w4/st3",  # 11.6 µs graph, 60% of copy
            2: "splitk 64x128/s16/w4/st3/mma",  # 14.5 µs graph, 48% of copy
            4: "splitk 64x128/s16/w4/st3/mma",  # 14.6 µs graph, 48% of copy
            8: "splitk 64x128/s16/w4/st3/mma",  # 14.7 µs graph, 48% of copy
            16: "splitk 64x128/s16/w4/st3/mma",  # 15.9 µs graph, 44% of copy
            32: "splitk 64x128/s16/w4/st3/mma",  # 18.3 µs graph, 38% of copy
            64: "triton 64x64x128/s8/w4/st4",  # 22.5 µs graph, 31% of copy
            128: "scaled_mm",  # 78.7 µs eager, 9% of copy
            256: "scaled_mm",  # 79.0 µs eager, 9% of copy
        },
        (8192, 2048): {  # tp4_o
            1: "gemv 8x1024/st4",  # 9.5 µs graph, 59% of copy
            2: "splitk 8x512/s1/w4/st3",  # 10.2 µs graph, 55% of copy
            4: "splitk 64x128/s8/w4/st3/mma",  # 12.8 µs graph, 44% of copy
            8: "splitk 64x128/s8/w4/st3/mma",  # 12.9 µs graph, 43% of copy
            16: "scaled_mm",  # 13.9 µs graph, 40% of copy
            32: "scaled_mm",  # 13.6 µs graph, 41% of copy
            64: "scaled_mm",  # 12.9 µs graph, 43% of copy
            128: "scaled_mm",  # 61.3 µs eager, 9% of copy
            256: "scaled_mm",  # 63.3 µs eager, 9% of copy
        },
        (14336, 8192): {  # tp4_gate_up
            1: "splitk 8x512/s1/w4/st3",  # 43.5 µs graph, 90% of copy
            2: "splitk 16x256/s1/w4/st3",  # 48.5 µs graph, 81% of copy
            4: "triton 16x64x256/s2/w4/st4",  # 48.8 µs graph, 80% of copy
            8: "triton 16x64x256/s2/w4/st4",  # 49.3 µs graph, 80% of copy
            16: "triton 16x64x256/s2/w4/st4",  # 50.1 µs graph, 78% of copy
            32: "triton 32x64x256/s2/w4/st4",  # 52.6 µs graph, 75% of copy
            64: "scaled_mm",  # 52.6 µs graph, 74% of copy
            128: "scaled_mm",  # 90.4 µs eager, 43% of copy
            256: "scaled_mm",  # 86.1 µs eager, 46% of copy
        },
        (8192, 7168): {  # tp4_down
            1: "gemv 8x1024/st4",  # 26.4 µs graph, 74% of copy
            2: "splitk 8x512/s1/w4/st3",  # 26.0 µs graph, 76% of copy
            4: "triton 16x64x256/s4/w4/st4",  # 31.6 µs graph, 62% of copy
            8: "splitk 64x128/s8/w4/st3/mma",  # 31.9 µs graph, 62% of copy
            16: "triton 16x64x256/s4/w4/st4",  # 32.2 µs graph, 61% of copy
            32: "triton 32x64x256/s4/w4/st4",  # 34.3 µs graph, 57% of copy
            64: "scaled_mm",  # 32.9 µs graph, 60% of copy
            128: "scaled_mm",  # 111.7 µs eager, 18% of copy
            256: "scaled_mm",  # 109.8 µs eager, 18% of copy
        },
    },
}


def m_bucket(m: int) -> int | None:
    """The smallest bucket that holds M tokens; None above the last (prefill)."""
    return next((b for b in M_BUCKETS if m <= b), None)


def default_choice(bucket: int, n: int, k: int, sms: int) -> GemmChoice:
    """For shapes the table lacks: the weight-only GEMV up to GEMV_TOKENS tokens (no MMA tile
    of padding, no activation quantization), the Triton GEMM of `default_mma_choice` above."""
    if bucket <= GEMV_TOKENS:
        return GemmChoice("gemv", default_gemv_config(n, sms, bucket))
    return default_mma_choice(bucket, n, k, sms)


def default_mma_choice(bucket: int, n: int, k: int, sms: int) -> GemmChoice:
    """The Triton GEMM with tiles from the problem shape.

    - block_m: the bucket (16 at least: the MMA's narrow side), 64 at most; block_n 64 up to
      64 tokens, then 128; block_k 256 (256 bytes of each weight row) up to 32 tokens, then 128.
    - split_k: K is split until the grid covers every SM twice, keeping two K blocks a split.
    - num_stages: as many as fit 96 KB of shared memory (2 to 4): two programs share an SM.
    - one or two tokens quantize inside the GEMM (x is a few KB; it saves a launch).
    """
    block_m = min(64, max(16, bucket))
    block_n = 64 if bucket <= 64 else 128
    block_k = 256 if bucket <= 32 else 128
    tiles = triton.cdiv(bucket, block_m) * triton.cdiv(n, block_n)
    k_steps = triton.cdiv(k, block_k)
    split_k = 1
    while tiles * split_k < 2 * sms and split_k * 4 <= k_steps:
        split_k *= 2
    stage_bytes = (block_m + block_n) * block_k
    num_stages = max(2, min(4, 98304 // stage_bytes))
    config = GemmConfig(block_m, block_n, block_k, split_k, 4, num_stages)
    return GemmChoice("triton_fused" if bucket <= 2 else "triton", config)


def scaled_mm_takes(n: int, k: int, out_dtype: torch.dtype) -> bool:
    """Whether `_scaled_mm` with row-wise scales takes this GEMM on every supported GPU."""
    return out_dtype == torch.bfloat16 and n % 16 == 0 and k % 16 == 0


@functools.lru_cache(maxsize=4096)
def choose(
    m: int,
    n: int,
    k: int,
    out_dtype: torch.dtype,
    device: torch.device,
    triton_only: bool = False,
) -> GemmChoice:
    """What runs y [m, n] = x [m, k] · Wᵀ in out_dtype on `device` (host ints only).

    :param triton_only: never `_scaled_mm` (backend="triton", and Triton's interpreter).
    """
    takes_scaled_mm = not triton_only and scaled_mm_takes(n, k, out_dtype)
    bucket = m_bucket(m)
    if bucket is None and takes_scaled_mm:
        return SCALED_MM
    if bucket is None:  # a long prefill in fp16/fp32 or an odd shape: big tiles
        return GemmChoice("triton", GemmConfig(64, 128, 128, 1, 4, 3))
    capability = (
        torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    )
    entry = TABLE.get(capability, {}).get((n, k), {}).get(bucket)
    if entry is None:
        return default_choice(bucket, n, k, num_sms(device))
    choice = GemmChoice.parse(entry)
    if choice.impl == "scaled_mm" and not takes_scaled_mm:
        return default_choice(bucket, n, k, num_sms(device))
    return choice
