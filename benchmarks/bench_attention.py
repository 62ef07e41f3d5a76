"""Paged attention on Llama-3.1-8B heads (32/8/128, bf16): time, byte floor, torch baselines.

    PYTHONPATH=src python benchmarks/bench_attention.py --out DIR
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/bench_attention.py --out DIR --smoke

Decode, B in {1, 8, 32, 64, 128} x context {640, 4096}, one layer: eager (do_bench, L2
flushed) and per call in a CUDA graph (calls on disjoint blocks while one fits in L2); floor =
(K/V read + q + out bytes) / the copy bandwidth measured in this run; baseline: K/V gathered
through the block table, then torch SDPA (gather included); the KV write apart. Prefill, 8192
tokens as 1 x 8192 and 16 x 512: TFLOP/s (causal 4·H·D·L(L+1)/2) against the bf16 matmul rate
at 8192³ measured in this run, beside SDPA. A sweep of configs around the defaults. Writes
DIR/bench_attention.json (device, versions, commit, configs, raw timings); prints a table last.
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

from loraplex.kernels.attention.decode import DecodeConfig, choose_decode_config
from loraplex.kernels.attention.kv_write import write_kv_triton
from loraplex.kernels.attention.paged import paged_attention_triton
from loraplex.kernels.attention.prefill import PrefillConfig, choose_prefill_config
from provenance import git_commit as provenance_commit
from sgmv_timing import GraphTimer, copy_bandwidth, eager

L2_BYTES = 50e6
GRAPH_CALLS = 16


class Bench:
    def __init__(self, device: torch.device, smoke: bool) -> None:
        self.device, self.smoke = device, smoke
        self.dtype = torch.float16 if smoke else torch.bfloat16  # numpy has no bf16
        heads = (4, 2, 16) if smoke else (32, 8, 128)
        self.num_heads, self.num_kv_heads, self.head_dim = heads
        self.block_size = 16
        self.timer = GraphTimer(device)
        self.copy = copy_bandwidth(device)
        max_tokens = 2 * 64 if smoke else 128 * 4096
        self.num_blocks = max_tokens // self.block_size
        shape = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.key_cache = torch.randn(shape, device=device).to(self.dtype)
        self.value_cache = torch.randn(shape, device=device).to(self.dtype)
        self.gen = torch.Generator().manual_seed(0)

    def us_at_copy_bw(self, num_bytes: float) -> float:
        return num_bytes / (self.copy["gbps"] * 1e3)

    def batch(self, lens: list[int], query_lens: list[int], shift: int = 0) -> dict:
        """Inputs of one call: block tables over random blocks (offset by `shift` blocks)."""
        width = max(-(-n // self.block_size) for n in lens)
        perm = torch.randperm(self.num_blocks, generator=self.gen)
        tables = (perm[: len(lens) * width].view(len(lens), width) + shift) % (
            self.num_blocks
        )
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        as_int = {"dtype": torch.int32, "device": self.device}
        query = torch.randn(starts[-1], self.num_heads, self.head_dim)
        return {
            "query": query.to(device=self.device, dtype=self.dtype),
            "key_cache": self.key_cache,
            "value_cache": self.value_cache,
            "block_tables": tables.to(**as_int),
            "query_start_loc": torch.tensor(starts, **as_int),
            "seq_lens": torch.tensor(lens, **as_int),
            "scale": self.head_dim**-0.5,
            "max_query_len": max(query_lens),
            "max_seq_len": max(lens),
        }


def _attention(b: dict, **configs) -> torch.Tensor:
    return paged_attention_triton(**b, **configs)


def _gathered_sdpa(b: dict, lens: list[int], query_lens: list[int]) -> torch.Tensor:
    """Torch baseline: gather each sequence's K/V into [S, KVH, max_len, D], then SDPA
    (one call for equal lengths, which every case here has; causal for prefill)."""
    kvh, dim = b["key_cache"].shape[2:]
    num_seqs, max_len = len(lens), max(lens)
    k = b["key_cache"][b["block_tables"].long()].view(num_seqs, -1, kvh, dim)
    v = b["value_cache"][b["block_tables"].long()].view(num_seqs, -1, kvh, dim)
    k = k[:, :max_len].transpose(1, 2)
    v = v[:, :max_len].transpose(1, 2)
    q = b["query"].view(num_seqs, query_lens[0], -1, dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q, k, v, is_causal=query_lens[0] > 1, enable_gqa=True
    )
    return out.transpose(1, 2).reshape(-1, q.shape[1], dim)


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def decode_cases(bench: Bench) -> list[dict]:
    sizes = ((1, 2), (40,)) if bench.smoke else ((1, 8, 32, 64, 128), (640, 4096))
    rows = []
    for context in sizes[1]:
        for batch_size in sizes[0]:
            try:  # one failing shape must not cost the others
                rows.append(_decode_case(bench, batch_size, context))
            except Exception:  # noqa: BLE001 - recorded and printed
                failure = traceback.format_exc()
                print(failure, file=sys.stderr)
                rows.append(
                    {"batch": batch_size, "context": context, "failed": failure}
                )
    return rows


def _decode_case(bench: Bench, batch_size: int, context: int) -> dict:
    lens, qlens = [context] * batch_size, [1] * batch_size
    b = bench.batch(lens, qlens)
    elem = torch.finfo(bench.dtype).bits // 8
    kv_bytes = 2 * batch_size * context * bench.num_kv_heads * bench.head_dim
    floor_bytes = (kv_bytes + 2 * batch_size * bench.num_heads * bench.head_dim) * elem
    config = choose_decode_config(
        batch_size,
        bench.num_kv_heads,
        context,
        bench.head_dim,
        bench.dtype,
        bench.device,
    )
    rec = {
        "batch": batch_size,
        "context": context,
        "config": vars(config),
        "floor_bytes": floor_bytes,
        "floor_us": bench.us_at_copy_bw(floor_bytes),
        "eager": eager(lambda: _attention(b), bench.device),
    }
    # Distinct blocks per graph call while a call would otherwise run from L2.
    sets = max(1, min(GRAPH_CALLS, math.ceil(3 * L2_BYTES / floor_bytes)))
    shift = bench.num_blocks // sets
    calls = [bench.batch(lens, qlens, shift * i) for i in range(sets)]
    calls = [lambda c=c: _attention(c) for c in calls]
    rec["graph"] = bench.timer.per_call(calls * (GRAPH_CALLS // sets))
    key = torch.randn(batch_size, bench.num_kv_heads, bench.head_dim)
    key = key.to(device=bench.device, dtype=bench.dtype)
    slots = torch.arange(batch_size, device=bench.device) * context
    rec["kv_write"] = eager(
        lambda: write_kv_triton(bench.key_cache, bench.value_cache, key, key, slots),
        bench.device,
    )
    rec.update(_baseline(bench, b, lens, qlens, graph=True))
    return rec


def _baseline(bench: Bench, b: dict, lens, qlens, graph: bool) -> dict:
    out = {}
    try:
        ours = _attention(b)
        out["sdpa_gathered_error_vs_ours"] = _error(
            _gathered_sdpa(b, lens, qlens), ours
        )
        out["sdpa_gathered_eager"] = eager(
            lambda: _gathered_sdpa(b, lens, qlens), bench.device
        )
        if graph:
            call = [lambda: _gathered_sdpa(b, lens, qlens)] * 4
            out["sdpa_gathered_graph"] = bench.timer.per_call(call)
    except Exception:  # noqa: BLE001 - a baseline must not cost our numbers
        out["sdpa_gathered_failed"] = traceback.format_exc()
    return out


def matmul_tflops(bench: Bench) -> dict:
    n = 256 if bench.smoke else 8192
    a = torch.randn(n, n, device=bench.device).to(bench.dtype)
    t = eager(lambda: a @ a, bench.device)
    return {"n": n, "tflops": 2 * n**3 / (t["median_us"] * 1e6), **t}


def prefill_cases(bench: Bench, matmul: dict) -> list[dict]:
    shapes = ((64, 1), (16, 4)) if bench.smoke else ((8192, 1), (512, 16))
    rows = []
    for length, count in shapes:
        lens, qlens = [length] * count, [length] * count
        b = bench.batch(lens, qlens)
        flops = 4 * bench.num_heads * bench.head_dim * count * length * (length + 1) / 2
        config = choose_prefill_config(bench.head_dim, bench.dtype, bench.device)
        t = eager(lambda b=b: _attention(b), bench.device)
        rec = {
            "length": length,
            "sequences": count,
            "config": vars(config),
            "flops": flops,
            "eager": t,
            "tflops": flops / (t["median_us"] * 1e6),
            "matmul_tflops": matmul.get("tflops", math.nan),
        }
        rec.update(_baseline(bench, b, lens, qlens, graph=False))
        if "sdpa_gathered_eager" in rec:
            rec["sdpa_tflops"] = flops / (rec["sdpa_gathered_eager"]["median_us"] * 1e6)
        rows.append(rec)
    return rows


def _sweep_point(bench: Bench, fn, **record) -> dict:
    """One timed config; a config that fails (compile, resources) is recorded, not fatal."""
    try:
        record["eager"] = eager(fn, bench.device)
    except Exception:  # noqa: BLE001 - the rest of the sweep still runs
        record["failed"] = traceback.format_exc().splitlines()[-1]
    return record


def sweep(bench: Bench) -> list[dict]:
    """Configs around the defaults; eager medians (L2 flushed)."""
    rows = []
    decode = ((64, 640), (32, 640), (8, 4096), (1, 4096))
    for batch_size, context in ((2, 40),) if bench.smoke else decode:
        b = bench.batch([context] * batch_size, [1] * batch_size)
        base = choose_decode_config(
            batch_size,
            bench.num_kv_heads,
            context,
            bench.head_dim,
            bench.dtype,
            bench.device,
        )
        # the split count is a runtime value: its variants cost no compile
        warps_stages = ((4, 2), (4, 3), (4, 5), (8, 3))  # 5 stages: 2 K/V buffers
        configs = {(base.block_n, base.num_splits, *ws) for ws in warps_stages}
        configs |= {(n, base.num_splits, 4, 3) for n in (32, 128)}
        if batch_size < 32:
            configs |= {(base.block_n, k, 4, 3) for k in (1, 2, 4, 8, 16, 32, 64)}
        else:
            configs |= {(base.block_n, 2, 4, 3)}
        for config in sorted(configs):
            cfg = DecodeConfig(*config)
            rows.append(
                _sweep_point(
                    bench,
                    lambda b=b, cfg=cfg: _attention(b, decode_config=cfg),
                    kernel="decode",
                    batch=batch_size,
                    context=context,
                    config=vars(cfg),
                    default=cfg == base,
                )
            )
    length = 64 if bench.smoke else 8192
    b = bench.batch([length], [length])
    base = choose_prefill_config(bench.head_dim, bench.dtype, bench.device)
    configs = {tuple(vars(base).values())}
    configs |= {(128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2)}
    for config in sorted(configs):
        cfg = PrefillConfig(*config)
        rows.append(
            _sweep_point(
                bench,
                lambda cfg=cfg: _attention(b, prefill_config=cfg),
                kernel="prefill",
                length=length,
                config=vars(cfg),
                default=cfg == base,
            )
        )
    return rows


def print_table(result: dict) -> None:
    info = result["info"]
    print(
        f"\n{info['device']}  torch {info['torch']}  triton {info['triton']}  "
        f"commit {info['commit']}  copy {info['copy_bandwidth']['gbps']:.0f} GB/s"
    )
    print("decode (bf16, 32/8/128): us per call; ratio = time / byte floor")
    print(
        f"{'B':>4} {'ctx':>5} {'splits':>6} {'floor':>8} {'graph':>8} {'ratio':>6} "
        f"{'eager':>8} {'ratio':>6} {'sdpa':>8} {'write':>7}"
    )
    for r in result["decode"]:
        if "failed" in r:
            print(
                f"{r['batch']:>4} {r['context']:>5} failed: {r['failed'].splitlines()[-1]}"
            )
            continue
        graph = (r["graph"] or {}).get("per_call_us", math.nan)
        eager_us = r["eager"]["median_us"]
        sdpa = r.get("sdpa_gathered_graph") or {}
        sdpa_us = sdpa.get(
            "per_call_us", r.get("sdpa_gathered_eager", {}).get("median_us", math.nan)
        )
        print(
            f"{r['batch']:>4} {r['context']:>5} {r['config']['num_splits']:>6} "
            f"{r['floor_us']:>8.1f} {graph:>8.1f} {graph / r['floor_us']:>6.2f} "
            f"{eager_us:>8.1f} {eager_us / r['floor_us']:>6.2f} {sdpa_us:>8.1f} "
            f"{r['kv_write']['median_us']:>7.1f}"
        )
    print("prefill (bf16, causal): ms, TFLOP/s, share of the bf16 matmul rate")
    for r in result["prefill"]:
        share = r["tflops"] / r["matmul_tflops"]
        print(
            f"  {r['sequences']:>2} x {r['length']:<5} {r['eager']['median_us'] / 1e3:>7.3f} ms "
            f"{r['tflops']:>6.0f} TFLOP/s {share:>5.0%} of {r['matmul_tflops']:.0f}; "
            f"sdpa {r.get('sdpa_tflops', math.nan):.0f} TFLOP/s"
        )
    by_shape: dict = {}
    for r in result["sweep"]:
        key = (r["kernel"], r.get("batch"), r.get("context"), r.get("length"))
        by_shape.setdefault(key, []).append(r)
    for key, rows in by_shape.items():
        timed = sorted(
            (r for r in rows if "eager" in r), key=lambda r: r["eager"]["median_us"]
        )
        default = [r["eager"]["median_us"] for r in timed if r["default"]] or [math.nan]
        failed = len(rows) - len(timed)
        if timed:
            print(
                f"sweep {key}: best {timed[0]['eager']['median_us']:.1f} us "
                f"{timed[0]['config']}, default {default[0]:.1f} us, {failed} failed"
            )
    for error in result["errors"]:
        print(f"ERROR in {error['section']}: {error['traceback'].splitlines()[-1]}")


def _commit() -> str:
    return provenance_commit()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    torch.manual_seed(0)
    bench = Bench(device, args.smoke)
    import triton

    info = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": _commit(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "dtype": str(bench.dtype),
        "heads": [bench.num_heads, bench.num_kv_heads, bench.head_dim],
        "block_size": bench.block_size,
        "copy_bandwidth": bench.copy,
    }
    if bench.timer.enabled:
        info["graph_replay_one_trivial"] = bench.timer.replay_one_trivial
    result = {"info": info, "matmul": {}}
    result.update({key: [] for key in ("decode", "prefill", "sweep", "errors")})
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_attention.json"
    sections = [
        ("decode", lambda: decode_cases(bench)),
        ("matmul", lambda: matmul_tflops(bench)),
        ("prefill", lambda: prefill_cases(bench, result["matmul"])),
        ("sweep", lambda: [] if args.no_sweep else sweep(bench)),
    ]
    for key, run in sections:
        # One failing section must not cost the others' numbers: GPU time is scarce.
        try:
            result[key] = run()
        except Exception:  # noqa: BLE001 - recorded in the JSON and printed
            result["errors"].append(
                {"section": key, "traceback": traceback.format_exc()}
            )
            print(result["errors"][-1]["traceback"], file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        path.write_text(json.dumps(result, indent=1, default=str))
    print_table(result)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
