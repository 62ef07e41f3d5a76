"""FP8 linears at decode and prefill sizes: bf16, _scaled_mm and the Triton kernels vs the floor.

    PYTHONPATH=src python benchmarks/bench_fp8.py --out DIR [--commit SHA] [--quick] \
        [--shapes 8b,70b-tp2,70b-tp4]
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/bench_fp8.py --out DIR --smoke  # CPU

Shapes: the Llama-3.1-8B linears (qkv 4096→6144, o 4096→4096, gate_up 4096→28672, down
14336→4096) and, with --shapes, the 70B linears' TP2/TP4 shards (fp8_candidates.py). M tokens in
{1, 2, 4, 8, 16, 32, 64, 128, 256, 8192}. Up to 64 tokens (decode) every way to run y = x Wᵀ is
timed replayed in a CUDA graph, as the engine runs it (eager timings there are mostly Triton's
~20-30 µs Python launch): each graph holds the call on enough weight copies that none is read
from L2, and the time per call is net of a replay's fixed cost. Above 64 tokens, eager timings
(median of triton.testing.do_bench, L2 flushed before each call). Ways: bf16 F.linear; FP8
through `_scaled_mm` (the per-token quantization launch included, as the engine runs it); the
Triton W8A8 GEMM, with the quantization launch and fused; the weight-only kernels of gemv.py and
splitk.py (every config of `splitk.sweep`); and the dispatch table's current entry. Each time
stands beside its floor (weight + x + y bytes at the copy bandwidth measured in the same run) and
its weight-read GB/s. Also the bf16 and FP8 matmul rates at 8192³.

Writes DIR/bench_fp8.json (device, versions, commit, every raw timing, errors) and
DIR/fp8_dispatch_candidate.py (the fastest impl per shape and M bucket, as dispatch.TABLE's
entries: paste them over the table's rows), and prints the fastest per shape and M last. With
--quick and all three shape groups, about 4 minutes on an H100 (guessed, not yet timed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from fp8_candidates import DECODE_MAX_TOKENS, choices, weight_copies
from fp8_candidates import shapes as shape_group
from loraplex.kernels import fp8
from loraplex.kernels.fp8 import dispatch
from loraplex.kernels.fp8._launch import num_sms
from provenance import git_commit as provenance_commit
from sgmv_timing import GraphTimer, copy_bandwidth, eager

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 8192)
PRINTED_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 8192)
L2_BYTES = 50e6


class Bench:
    def __init__(self, device: torch.device, args: argparse.Namespace) -> None:
        self.device, self.smoke, self.quick = device, args.smoke, args.quick
        self.shapes = shape_group(args.shapes, args.smoke)
        self.dtype = (
            torch.float16 if args.smoke else torch.bfloat16
        )  # numpy has no bf16
        self.capability = (
            None if args.smoke else torch.cuda.get_device_capability(device)
        )
        self.sms = num_sms(device)
        self.copy = copy_bandwidth(device)
        self.timer = GraphTimer(device)
        self.rows: list[dict] = []
        self.errors: list[dict] = []

    def floor_us(self, m: int, n: int, k: int) -> float:
        num_bytes = n * k + 2 * m * k + 2 * m * n  # fp8 weight, bf16 x in and y out
        return num_bytes / (self.copy["gbps"] * 1e3)

    def time(self, fn, graph_calls) -> dict:
        """Eager (do_bench) without graph_calls or without CUDA; else per call in a graph."""
        if graph_calls is None or not self.timer.enabled:
            return {"timing": "eager", **eager(fn, self.device)}
        timed = self.timer.per_call(graph_calls)
        fixed, calls = self.timer.replay_one_trivial["median_us"], timed["calls"]
        replay = timed["replay"]
        return {
            "timing": "graph",
            "median_us": timed["per_call_us"],
            "p10_us": (replay["p10_us"] - fixed) / calls,
            "p90_us": (replay["p90_us"] - fixed) / calls,
            "calls": calls,
            "samples_ms": replay["samples_ms"],
        }

    def record(self, shape, m, impl, config, fn, graph_calls=None) -> dict | None:
        n, k = self.shapes[shape]
        try:
            timing = self.time(fn, graph_calls)
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
            **timing,
            "weight_gbps": weight_bytes / (us * 1e3),
            "floor_us": self.floor_us(m, n, k),
        }
        row["floor_ratio"] = us / row["floor_us"]
        self.rows.append(row)
        return row

    def shape_case(self, shape: str, m: int) -> None:
        """Every way to run M tokens through `shape`; in CUDA graphs up to 64 tokens."""
        n, k = self.shapes[shape]
        decode = m <= DECODE_MAX_TOKENS and self.timer.enabled
        copies = weight_copies(n, k, L2_BYTES) if decode else 1
        gen = torch.Generator(device=self.device).manual_seed(m + n)
        x = torch.randn(m, k, device=self.device, generator=gen).to(self.dtype)
        weights = [
            (torch.randn(n, k, device=self.device, generator=gen) * k**-0.5).to(
                self.dtype
            )
            for _ in range(copies)
        ]
        quantized = [fp8.quantize_weight(w) for w in weights]

        def timed(impl, config, call) -> None:  # call(w, w_q, w_scales)
            fns = [
                lambda w=w, q=q, s=s: call(w, q, s)
                for w, (q, s) in zip(weights, quantized, strict=True)
            ]
            self.record(shape, m, impl, config, fns[0], fns * 2 if decode else None)

        timed("bf16", None, lambda w, q, s: F.linear(x, w))
        x_q, x_scales = fp8.quantize_per_token(x)
        timed(
            "scaled_mm_gemm_only",
            None,
            lambda w, q, s: fp8.scaled_mm(x_q, x_scales, q, s, out_dtype=self.dtype),
        )
        for choice in choices(m, n, k, self.sms, self.quick, self.capability):
            timed(
                choice.impl,
                choice.config,
                lambda w, q, s, c=choice: fp8.fp8_linear(x, q, s, choice=c),
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
                pct = 100 * best["weight_gbps"] / bench.copy["gbps"]
                lines.append(
                    f'            {bucket}: "{_entry(best)}",  # {best["median_us"]:.1f} µs '
                    f"{best['timing']}, {pct:.0f}% of copy"
                )
        lines.append("        },")
    return "\n".join([*lines, "    },", "}", ""])


def print_table(bench: Bench, shapes: dict, rates: dict, info: dict) -> None:
    print(f"\nFP8 linears on {info['device']} ({info['date']}, {info['commit']}), µs")
    print(f"copy bandwidth {bench.copy['gbps']:.0f} GB/s (read + write)")
    for name, rate in rates.items():
        print(f"{name} at 8192³: {rate['tflops']:.0f} TFLOP/s")
    print(
        f"{'shape':11} {'M':>5} {'bf16':>7} {'sc_mm':>7} {'triton':>7} {'fused':>7} "
        f"{'gemv':>7} {'splitk':>7} "
        f"{'floor':>6}  {'chosen':38} {'GB/s':>5} {'%copy':>5}"
    )
    for shape in shapes:
        for m in TOKENS[:4] if bench.smoke else PRINTED_TOKENS:
            best = bench.best(shape, m)
            if best is None:
                continue
            cells = []
            impls = ("bf16", "scaled_mm", "triton", "triton_fused", "gemv", "splitk")
            for impl in impls:
                row = bench.best(shape, m, (impl,))
                cells.append(f"{row['median_us']:7.1f}" if row else f"{'-':>7}")
            pct = 100 * best["weight_gbps"] / bench.copy["gbps"]
            print(
                f"{shape:11} {m:5d} {' '.join(cells)} {best['floor_us']:6.1f}  "
                f"{_entry(best):38} {best['weight_gbps']:5.0f} {pct:5.0f}"
            )
    print(
        f"µs per call: replayed in CUDA graphs, weights rotated past L2, up to "
        f"{DECODE_MAX_TOKENS} tokens; above, eager medians, L2 flushed before each call; "
        "chosen: the fastest FP8 linear, quantization included; %copy: weight bytes read "
        "per second / copy bandwidth"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--commit", default=None, help="default: git rev-parse HEAD")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument(
        "--quick", action="store_true", help="the heuristic configs only"
    )
    parser.add_argument(
        "--shapes", default="8b", help="comma-separated: 8b, 70b-tp2, 70b-tp4"
    )
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    bench = Bench(device, args)
    shapes = bench.shapes
    tokens = TOKENS[:4] if args.smoke else TOKENS
    import triton

    commit = args.commit or _git_commit()
    capability = bench.capability
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
        "shapes": shapes,
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
