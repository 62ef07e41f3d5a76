"""The shapes bench_fp8.py times and the FP8 impls it tries per shape and token count.

Shapes: the Llama-3.1-8B linears ("8b") and the Llama-3.1-70B linears' tensor-parallel shards
("70b-tp2", "70b-tp4": q/k/v and gate/up split by columns, o and down by rows).
"""

from __future__ import annotations

from loraplex.kernels.fp8 import dispatch, gemv, splitk
from loraplex.kernels.fp8.gemm import GemmConfig

SHAPE_GROUPS = {
    "8b": {
        "qkv": (6144, 4096),
        "o": (4096, 4096),
        "gate_up": (28672, 4096),
        "down": (4096, 14336),
    },
    "70b-tp2": {
        "tp2_qkv": (5120, 8192),
        "tp2_o": (8192, 4096),
        "tp2_gate_up": (28672, 8192),
        "tp2_down": (8192, 14336),
    },
    "70b-tp4": {
        "tp4_qkv": (2560, 8192),
        "tp4_o": (8192, 2048),
        "tp4_gate_up": (14336, 8192),
        "tp4_down": (8192, 7168),
    },
}
TINY = {"qkv": (128, 64), "o": (64, 64), "gate_up": (192, 64), "down": (64, 96)}
DECODE_MAX_TOKENS = 64  # up to here every impl is timed replayed in a CUDA graph
FUSED_MAX_TOKENS = 16


def shapes(groups: str, smoke: bool) -> dict[str, tuple[int, int]]:
    """name → (N, K) of the comma-separated groups (TINY for the CPU smoke run)."""
    if smoke:
        return dict(TINY)
    chosen = {}
    for group in groups.split(","):
        if group not in SHAPE_GROUPS:
            raise SystemExit(
                f"--shapes: {group!r} is not one of {sorted(SHAPE_GROUPS)}"
            )
        chosen.update(SHAPE_GROUPS[group])
    return chosen


def mma_candidates(m: int, n: int, k: int, sms: int, quick: bool) -> list[GemmConfig]:
    """The W8A8 Triton GEMM: the heuristic's config first, then neighbours: block_n 32 and 128
    (split re-derived), twice the split, 8 warps from 64 tokens, 128-token tiles above 64
    tokens. Few enough distinct kernels that compiling them stays under a minute."""
    bucket = dispatch.m_bucket(m)
    base = dispatch.default_mma_choice(bucket, n, k, sms).config
    configs = [base]
    k_steps = -(-k // base.block_k)
    if not quick:
        for block_n in (32, 128):
            tiles = -(-bucket // base.block_m) * -(-n // block_n)
            split = 1
            while tiles * split < 2 * sms and split * 4 <= k_steps:
                split *= 2
            configs.append(_with(base, block_n=block_n, split_k=split))
        if k_steps // (2 * base.split_k) >= 2:
            configs.append(_with(base, split_k=2 * base.split_k))
        if m >= 64:
            configs.append(_with(base, num_warps=8))
        if m > 64:
            configs.append(GemmConfig(128, 64, 128, base.split_k, 8, 3))
    return _unique(configs)


def choices(
    m: int, n: int, k: int, sms: int, quick: bool, capability
) -> list[dispatch.GemmChoice]:
    """Every FP8 linear to time for M tokens of an [N, K] weight: `_scaled_mm`; the W8A8
    Triton tiles (fused quantization for the heuristic's tiles up to FUSED_MAX_TOKENS);
    the weight-only GEMV (its default and the table's entry with --quick, a sweep without);
    every split-K config of `splitk.sweep`; and whatever the table holds now."""
    picks = [dispatch.SCALED_MM]
    if dispatch.m_bucket(m) is None:
        return picks  # prefill past the buckets: `_scaled_mm`'s ground
    for index, config in enumerate(mma_candidates(m, n, k, sms, quick)):
        picks.append(dispatch.GemmChoice("triton", config))
        if index == 0 and m <= FUSED_MAX_TOKENS:
            picks.append(dispatch.GemmChoice("triton_fused", config))
    if m > DECODE_MAX_TOKENS:
        return _unique(picks)  # the weight-only kernels stop at 64 tokens
    cuda_cores = m <= gemv.GEMV_TOKENS
    if quick:
        gemvs = [gemv.default_gemv_config(n, sms, m)]
    else:
        gemvs = [
            gemv.GemvConfig(block_n, block_k)
            for block_n in ((4, 8, 16, 32) if cuda_cores else (16, 32, 64))
            for block_k in ((256, 512, 1024) if cuda_cores else (128, 256))
        ]
    picks += [dispatch.GemmChoice("gemv", c) for c in gemvs]
    picks += [dispatch.GemmChoice("splitk", c) for c in splitk.sweep(m, n, k, sms)]
    entry = dispatch.TABLE.get(capability, {}).get((n, k), {}).get(dispatch.m_bucket(m))
    if entry is not None:
        picks.append(dispatch.GemmChoice.parse(entry))
    return _unique(picks)


def _with(config: GemmConfig, **changes) -> GemmConfig:
    fields = {f: getattr(config, f) for f in config.__dataclass_fields__}
    return GemmConfig(**{**fields, **changes})


def _unique(items: list) -> list:
    unique = []
    for item in items:
        if item not in unique:
            unique.append(item)
    return unique


def weight_copies(n: int, k: int, l2_bytes: float) -> int:
    """FP8 weights to rotate through so that no graph-replayed call finds its weight in L2."""
    return max(2, -(-int(2 * l2_bytes) // (n * k)))
