"""The issue-3 targets and the short table, from a bench_sgmv JSON result.

python benchmarks/sgmv_report.py benchmarks/results/bench_sgmv-<card>-<date>.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

BANDWIDTH_TARGET = 0.70  # of measured copy bandwidth, where the byte floor is >= 10 us
FLOOR_FOR_BANDWIDTH_US = 10.0
GRAPH_LATENCY_TARGET_US = 8.0  # one LoRA linear in a graph, below that floor
SPEEDUP_TARGET = 2.5  # geometric mean over decode shapes, vs the faster torch baseline
MIXED_TARGET = 1.10  # mixed ranks vs the rank-weighted ideal


def _main_cases(result):
    return [
        c
        for c in result["cases"]
        if c["ranks"] == [16] and c["max_rank"] == 16 and "loop_eager" in c
    ]


def _unique(cases):
    seen, out = set(), []
    for c in cases:
        key = (c["phase"], c["linear"], c["num_tokens"])
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _graph(c, name):
    g = c.get(f"{name}_graph")
    return g["per_call_us"] if g else None


def _device_us(c, kernel):
    """Device time of one kernel: in a graph where measured (no host launch overhead)."""
    graph = _graph(c, kernel)
    return graph if graph is not None else c[f"{kernel}_eager"]["median_us"]


def targets(result) -> dict:
    cases = _unique(_main_cases(result))
    bandwidth = []
    for c in cases:
        for kernel in ("shrink", "expand"):
            floor = c["floor_us"][kernel]
            if floor >= FLOOR_FOR_BANDWIDTH_US:
                frac = floor / _device_us(c, kernel)
                bandwidth.append(
                    {
                        "case": f"{c['phase']} T={c['num_tokens']} {c['linear']}",
                        "kernel": kernel,
                        "floor_us": floor,
                        "fraction": frac,
                        "met": frac >= BANDWIDTH_TARGET,
                    }
                )
    latency, speedups_graph, speedups_eager = [], [], []
    for c in cases:
        if c["phase"] != "decode":
            continue
        ours = _graph(c, "linear")
        if ours is not None and c["floor_us"]["linear"] < FLOOR_FOR_BANDWIDTH_US:
            latency.append(
                {
                    "case": f"T={c['num_tokens']} {c['linear']}",
                    "graph_us": ours,
                    "met": ours <= GRAPH_LATENCY_TARGET_US,
                }
            )
        peers = [_graph(c, n) for n in ("gather", "loop")]
        peers = [p for p in peers if p is not None]
        if ours and peers:
            speedups_graph.append(min(peers) / ours)
        peers_eager = [
            c[f"{n}_eager"]["median_us"]
            for n in ("gather", "loop")
            if f"{n}_eager" in c
        ]
        speedups_eager.append(min(peers_eager) / c["linear_eager"]["median_us"])

    def geomean(xs):
        return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")

    mixed = [
        {
            "case": f"{m['phase']} T={m['num_tokens']} {m['linear']}",
            # Results from before the rank-major pool carry no layout: B was out-major then.
            "b_layout": m.get("b_layout", "out_major"),
            **{mode: m[mode] for mode in ("linear_eager", "linear_graph") if mode in m},
        }
        for m in result["mixed_ranks"]
    ]
    return {
        "bandwidth": bandwidth,
        "graph_latency": latency,
        "speedup_geomean_graph": geomean(speedups_graph),
        "speedup_geomean_eager": geomean(speedups_eager),
        "mixed": mixed,
    }


def _fmt(x, width=7):
    if isinstance(x, int | float) and not math.isnan(x):
        return f"{x:{width}.1f}"
    return " " * (width - 1) + "-"


def print_report(result) -> None:
    info = result["info"]
    print(
        f"\nSGMV on {info['device']} ({info['date']}, commit {info['commit'][:10]}), "
        f"{info['dtype']}, copy {info['copy_bandwidth']['gbps']:.0f} GB/s, "
        f"graph node {info.get('graph_trivial_node_us', float('nan')):.2f} us"
    )
    print(
        "phase    T     linear  | shrink us %bw | expand us %bw | linear: eager  graph"
        "  floor | fused  split | gather   loop | x vs best"
    )
    for c in _unique(_main_cases(result)):
        row = [f"{c['phase']:<8} {c['num_tokens']:<5} {c['linear']:<7} |"]
        for kernel in ("shrink", "expand"):
            t = _device_us(c, kernel)
            row.append(f"{_fmt(t, 9)} {100 * c['floor_us'][kernel] / t:3.0f} |")
        graph = _graph(c, "linear")
        row.append(
            f"{_fmt(c['linear_eager']['median_us'], 13)} {_fmt(graph, 6)} "
            f"{_fmt(c['floor_us']['linear'], 6)} |"
        )
        row.append(f"{_fmt(_graph(c, 'fused'), 6)} {_fmt(_graph(c, 'split'), 6)} |")
        peers = {}
        for n in ("gather", "loop"):
            peers[n] = _graph(c, n) if c["phase"] == "decode" else None
            if peers[n] is None and f"{n}_eager" in c:
                peers[n] = c[f"{n}_eager"]["median_us"]
        row.append(f"{_fmt(peers['gather'], 7)} {_fmt(peers['loop'], 7)} |")
        ours = (
            graph
            if c["phase"] == "decode" and graph
            else c["linear_eager"]["median_us"]
        )
        best = min(p for p in peers.values() if p is not None)
        row.append(f" {best / ours:5.1f}x")
        print(" ".join(row))
    t = targets(result)
    missed_bw = [b for b in t["bandwidth"] if not b["met"]]
    print(
        f"\n>=70% copy bw where floor >=10us: {len(t['bandwidth']) - len(missed_bw)}"
        f"/{len(t['bandwidth'])} met"
        + "".join(
            f"\n   missed {b['case']} {b['kernel']}: {100 * b['fraction']:.0f}%"
            for b in missed_bw
        )
    )
    slow = [x for x in t["graph_latency"] if not x["met"]]
    print(
        f"one LoRA linear <= 8us in a graph (small decode): "
        f"{len(t['graph_latency']) - len(slow)}/{len(t['graph_latency'])} met"
        + "".join(f"\n   missed {x['case']}: {x['graph_us']:.1f} us" for x in slow)
    )
    print(
        f"decode geomean speedup vs faster torch baseline: "
        f"graph {t['speedup_geomean_graph']:.2f}x, eager {t['speedup_geomean_eager']:.2f}x"
        f" (target {SPEEDUP_TARGET}x)"
    )
    if t["mixed"]:
        print(
            f"mixed ranks / ideal (target <= {MIXED_TARGET:.2f})  b_layout    eager  graph"
        )
    for m in t["mixed"]:
        ratios = [
            m[mode]["ratio"] if mode in m else None
            for mode in ("linear_eager", "linear_graph")
        ]
        cells = ("     -" if r is None else f"{r:6.2f}" for r in ratios)
        print(f"   {m['case']:<31} {m['b_layout']:<10} " + " ".join(cells))
    for s in result["decode_step"]:
        graph = s["graph"]["per_call_us"] if s["graph"] else float("nan")
        print(
            f"decode step T={s['num_tokens']}: {s['launches']['total']} launches for "
            f"{s['lora_linears']} LoRA linears, {graph:.0f} us in a graph "
            f"(launches x trivial node {s.get('launch_cost_us', float('nan')):.0f} us; "
            f"base FP8 weight floor {result['base_fp8_weight_floor_us']:.0f} us)"
        )
    if result["sweep"]:
        print("sweep, us per call in a graph (default, then the best other config):")
        rows: dict = {}
        for row in result["sweep"]:
            key = (row["kernel"], row["linear"], row["num_tokens"])
            rows.setdefault(key, []).append(row)
        for key, group in rows.items():
            default = [
                r for r in group if r["config"] == "default" and r["tile_tokens"] == 64
            ]
            best = min(group, key=lambda r: r["median_us"])
            print(
                f"   {key}: default {default[0]['median_us'] if default else float('nan'):.1f}"
                f", best {best['median_us']:.1f} (tile {best['tile_tokens']}, {best['config']})"
            )


if __name__ == "__main__":
    print_report(json.loads(Path(sys.argv[1]).read_text()))
