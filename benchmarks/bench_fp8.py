"""FP8 linears on the Llama-3.1-8B shapes: bf16, _scaled_mm and the Triton kernels vs the floor.

    PYTHONPATH=src python benchmarks/bench_fp8.py --out DIR [--commit SHA] [--quick]
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/bench_fp8.py --out DIR --smoke  # CPU

For qkv (4096→6144), o (4096→4096), gate_up (4096→28672) and down (14336→4096) and M tokens in
{1, 2, 4, 8, 16, 32, 64, 128, 256, 8192}, times (median of triton.testing.do_bench, L2 flushed
before each call) every way to run y = x Wᵀ: bf16 F.linear; FP8 through `_scaled_mm` (the
per-token quantization launch included, as the engine runs it); the Triton FP8 GEMM over a
few tile configs around the dispatch heuristic, with the quantization launch and fused. Each
time stands beside its floor (weight + x + y bytes at the copy bandwidth measured in the same
run) and its weight-read GB/s. Also: the bf16 and FP8 matmul rates at 8192³, and the chosen
impls replayed in CUDA graphs (weights rotated so that no call reads them from L2).

Writes DIR/bench_fp8.json (device, versions, commit, every raw timing, errors) and
DIR/fp8_dispatch_candidate.py (the fastest impl per shape and M bucket, as dispatch.TABLE's
entries), and prints a short table last. About 1-2 minutes on an H100.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from loraplex.kernels import fp8
from loraplex.kernels.fp8 import dispatch, gemv
from loraplex.kernels.fp8._launch import num_sms
from loraplex.kernels.fp8.gemm import GemmConfig
from provenance import git_commit as provenance_commit
from sgmv_timing import GraphTimer, copy_bandwidth, eager

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096)}
SHAPES["down"] = (4096, 14336)
TINY = {"qkv": (128, 64), "o": (64, 64), "gate_up": (192, 64), "down": (64, 96)}
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 8192)
PRINTED_TOKENS = (1, 8, 16, 32, 64, 128, 256, 8192)
GRAPH_TOKENS = (1, 8, 64)
L2_BYTES = 50e6
FUSED_MAX_TOKENS = 16


def candidates(m: int, n: int, k: int, sms: int, quick: bool) -> list[GemmConfig]:
    """The heuristic's config first, then neighbours: block_n 32 and 128 (split re-derived),
    twice the split, 8 warps from 64 tokens, 128-token tiles above 64 tokens. Few enough
    distinct kernels that compiling them stays under a minute."""
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
    unique = []
    for config in configs:
        if config not in unique:
            unique.append(config)
    return unique


def _with(config: GemmConfig, **changes) -> GemmConfig:
    fields = {f: getattr(config, f) for f in config.__dataclass_fields__}
    return GemmConfig(**{**fields, **changes})


class Bench:
    def __init__(self, device: torch.device, smoke: bool, quick: bool) -> None:
        self.device, self.smoke, self.quick = device, smoke, quick
        self.dtype = torch.float16 if smoke else torch.bfloat16  # numpy has no bf16
        self.sms = num_sms(device)
        self.copy = copy_bandwidth(device)
        self.timer = GraphTimer(device)
        self.rows: list[dict] = []
        self.errors: list[dict] = []

    def floor_us(self, m: int, n: int, k: int) -> float:
        num_bytes = n * k + 2 * m * k + 2 * m * n  # fp8 weight, bf16 x in and y out
        return num_bytes / (self.copy["gbps"] * 1e3)

    def record(self, shape: str, m: int, impl: str, config, fn) -> dict | None:
        n, k = (TINY if self.smoke else SHAPES)[shape]
        try:
            timing = eager(fn, self.device)
        except Exception:  # noqa: BLE001 - one failing config must not cost the run
            self.errors.append(
                {"shape": shape, "m": m, "impl": impl, "config": str(config)}
                | {"traceback": traceback.format_exc()}
            )
            print(self.errors[-1]["traceback"], file=sys.stderr)
            return None
        weight_bytes = n * k * (2 if impl == "bf16" else 1)
        us = timing["median_us"]
        row = {
            "shape": shape,
            "n": n,
            "k": k,
            "m": m,
            "impl": impl,
            "config": None if config is None else str(config),
            "median_us": us,
            "p10_us": timing["p10_us"],
            "p90_us": timing["p90_us"],
            "weight_gbps": weight_bytes / (us * 1e3),
            "floor_us": self.floor_us(m, n, k),
            "samples_ms": timing["samples_ms"],
        }
        row["floor_ratio"] = us / row["floor_us"]
        self.rows.append(row)
        return row

    def shape_case(self, shape: str, m: int) -> None:
        n, k = (TINY if self.smoke else SHAPES)[shape]
        gen = torch.Generator(device=self.device).manual_seed(m + n)
        x = torch.randn(m, k, device=self.device, generator=gen).to(self.dtype)
        w = (torch.randn(n, k, device=self.device, generator=gen) * k**-0.5).to(
            self.dtype
        )
        w_q, w_scales = fp8.quantize_weight(w)
        self.record(shape, m, "bf16", None, lambda: F.linear(x, w))
        self.record(
            shape,
            m,
            "scaled_mm",
            None,
            lambda: fp8.fp8_linear(x, w_q, w_scales, choice=dispatch.SCALED_MM),
        )
        x_q, x_scales = fp8.quantize_per_token(x)
        self.record(
            shape,
            m,
            "scaled_mm_gemm_only",
            None,
            lambda: fp8.scaled_mm(x_q, x_scales, w_q, w_scales, out_dtype=self.dtype),
        )
        if dispatch.m_bucket(m) is None:
            return  # prefill: _scaled_mm's ground
        if m <= gemv.MAX_TOKENS:
            cuda_cores = m <= gemv.GEMV_TOKENS
            for block_n in (4, 8, 16, 32) if cuda_cores else (16, 32, 64):
                for block_k in (256, 512, 1024) if cuda_cores else (128, 256):
                    config = gemv.GemvConfig(block_n, block_k)
                    choice = dispatch.GemmChoice("gemv", config)
                    self.record(
                        shape,
                        m,
                        "gemv",
                        config,
                        lambda c=choice: fp8.fp8_linear(x, w_q, w_scales, choice=c),
                    )
        for index, config in enumerate(candidates(m, n, k, self.sms, self.quick)):
            fused = index == 0 and m <= FUSED_MAX_TOKENS  # the heuristic's tiles only
            for impl in ["triton"] + (["triton_fused"] if fused else []):
                choice = dispatch.GemmChoice(impl, config)
                self.record(
                    shape,
                    m,
                    impl,
                    config,
                    lambda c=choice: fp8.fp8_linear(x, w_q, w_scales, choice=c),
                )

    def best(self, shape: str, m: int, impls=None) -> dict | None:
        rows = [
            r
            for r in self.rows
            if r["shape"] == shape
            and r["m"] == m
            and (
                r["impl"] in impls
                if impls is not None
                else r["impl"] not in ("bf16", "scaled_mm_gemm_only")
            )
        ]
        return min(rows, key=lambda r: r["median_us"], default=None)

    def graph_case(self, shape: str, m: int) -> dict:
        """bf16 and the chosen FP8 impl replayed in a graph, weights rotated past L2."""
        n, k = (TINY if self.smoke else SHAPES)[shape]
        best = self.best(shape, m)
        choice = dispatch.GemmChoice.parse(_entry(best))
        copies = max(2, math.ceil(2 * L2_BYTES / (n * k)))
        x = torch.randn(m, k, device=self.device).to(self.dtype)
        weights = [
            torch.randn(n, k, device=self.device).to(self.dtype) for _ in range(copies)
        ]
        quantized = [fp8.quantize_weight(w) for w in weights]
        bf16 = self.timer.per_call([lambda w=w: F.linear(x, w) for w in weights] * 2)
        ours = self.timer.per_call(
            [
                lambda q=q, s=s: fp8.fp8_linear(x, q, s, choice=choice)
                for q, s in quantized
            ]
            * 2
        )
        return {
            "shape": shape,
            "m": m,
            "choice": str(choice),
            "bf16": bf16,
            "fp8": ours,
        }


def _entry(row: dict) -> str:
    return row["impl"] if row["config"] is None else f"{row['impl']} {row['config']}"


def matmul_rates(device: torch.device) -> dict:
    """bf16 torch.matmul and FP8 _scaled_mm (row-wise scales) TFLOP/s at 8192³."""
    if device.type != "cuda":
        return {}
    size = 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    a_q, a_s = fp8.quantize_per_token(a)
    b_q, b_s = fp8.quantize_weight(b)
    flops = 2 * size**3
    rates = {}
    for name, fn in {
        "bf16_matmul": lambda: a @ b.T,
        "fp8_scaled_mm_rowwise": lambda: fp8.scaled_mm(a_q, a_s, b_q, b_s),
    }.items():
        timing = eager(fn, device)
        rates[name] = {"tflops": flops / (timing["median_us"] * 1e6), **timing}
    return rates


def candidate_table(bench: Bench, shapes: dict, capability, stamp: str) -> str:
    lines = [
        f"# Written by benchmarks/bench_fp8.py: {stamp}.",
        "# Paste into dispatch.TABLE and name this run in its comment.",
        "TABLE = {",
        f"    {capability}: {{",
    ]
    for shape, (n, k) in shapes.items():
        lines.append(f"        ({n}, {k}): {{  # {shape}")
        for bucket in dispatch.M_BUCKETS:
            best = bench.best(shape, bucket)
            if best is not None:
                lines.append(f'            {bucket}: "{_entry(best)}",')
        lines.append("        },")
    return "\n".join([*lines, "    },", "}", ""])


def print_table(bench: Bench, shapes: dict, rates: dict, info: dict) -> None:
    print(f"\nFP8 linears on {info['device']} ({info['date']}, {info['commit']}), µs")
    print(f"copy bandwidth {bench.copy['gbps']:.0f} GB/s (read + write)")
    for name, rate in rates.items():
        print(f"{name} at 8192³: {rate['tflops']:.0f} TFLOP/s")
    print(
        f"{'shape':8} {'M':>5} {'bf16':>7} {'sc_mm':>7} {'triton':>7} {'fused':>7} "
        f"{'gemv':>7} "
        f"{'floor':>6}  {'chosen':34} {'GB/s':>5} {'%copy':>5}"
    )
    for shape in shapes:
        for m in TOKENS[:4] if bench.smoke else PRINTED_TOKENS:
            best = bench.best(shape, m)
            if best is None:
                continue
            cells = []
            for impl in ("bf16", "scaled_mm", "triton", "triton_fused", "gemv"):
                row = bench.best(shape, m, (impl,))
                cells.append(f"{row['median_us']:7.1f}" if row else f"{'-':>7}")
            pct = 100 * best["weight_gbps"] / bench.copy["gbps"]
            print(
                f"{shape:8} {m:5d} {' '.join(cells)} {best['floor_us']:6.1f}  "
                f"{_entry(best):34} {best['weight_gbps']:5.0f} {pct:5.0f}"
            )
    print(
        "median µs, L2 flushed before each call; chosen: the fastest FP8 linear, "
        "quantization included; %copy: weight bytes read per second / copy bandwidth"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--commit", default=None, help="default: git rev-parse HEAD")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument(
        "--quick", action="store_true", help="the heuristic configs only"
    )
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    bench = Bench(device, args.smoke, args.quick)
    shapes = TINY if args.smoke else SHAPES
    tokens = TOKENS[:4] if args.smoke else TOKENS
    import triton

    commit = args.commit or _git_commit()
    capability = torch.cuda.get_device_capability(device) if not args.smoke else None
    info = {
        "device": torch.cuda.get_device_name(device) if not args.smoke else "cpu",
        "capability": capability,
        "sms": bench.sms,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "dtype": str(bench.dtype),
        "copy_bandwidth": bench.copy,
    }
    result = {"info": info, "rows": bench.rows, "errors": bench.errors}
    args.out.mkdir(parents=True, exist_ok=True)
    for shape in shapes:
        for m in tokens:
            bench.shape_case(shape, m)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    sections = {
        "matmul_rates": lambda: matmul_rates(device),
        "graphs": lambda: [
            bench.graph_case(shape, m)
            for shape in shapes
            for m in GRAPH_TOKENS
            if bench.timer.enabled
        ],
    }
    for key, run in sections.items():
        try:
            result[key] = run()
        except Exception:  # noqa: BLE001 - recorded in the JSON and printed
            bench.errors.append({"section": key, "traceback": traceback.format_exc()})
            print(bench.errors[-1]["traceback"], file=sys.stderr)
    stamp = f"{info['device']}, {info['date']}, commit {commit}"
    table = candidate_table(bench, shapes, tuple(capability or ()), stamp)
    result["dispatch_candidate"] = table
    (args.out / "bench_fp8.json").write_text(json.dumps(result, indent=1))
    (args.out / "fp8_dispatch_candidate.py").write_text(table)
    print_table(bench, shapes, result.get("matmul_rates", {}), info)
    if bench.errors:
        print(f"{len(bench.errors)} errors: see bench_fp8.json", file=sys.stderr)


def _git_commit() -> str:
    return provenance_commit()


if __name__ == "__main__":
    main()
