"""The two decode expands of bench_sgmv.py side by side: per-block and multi-block (issue 3).

For every decode case of the bench (each LoRA linear, T = 1, 16, 64, 256 tokens, one adapter per
token, rank 16): both variants with the configs `sgmv_expand` picks for them, eager and per call
replayed in a CUDA graph over rotating input sets (as the bench's cases are timed); at T >= 64
also every multi-block config of `DECODE_CANDIDATES`, in graphs. Each row records the config
that ran and how far its delta lies from the per-block one's on the same inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import torch

from loraplex.kernels import sgmv
from loraplex.kernels.sgmv.expand import expand_config_for, sgmv_expand
from loraplex.kernels.sgmv.expand_blocks import DECODE_CANDIDATES
from sgmv_timing import LoraInputs, eager, floor_bytes

VARIANTS = ("per_block", "multi_block")


def expand_how(s: LoraInputs, v: torch.Tensor, how: dict) -> None:
    """The expand of one variant ({"variant": ...}) or config ({"config": ...})."""
    args = (s.y, v, s.lora_b, s.ranks, s.scales, s.linear.offsets, s.segments)
    sgmv_expand(*args, **how)


def _delta(s: LoraInputs, v: torch.Tensor, how: dict) -> torch.Tensor:
    y = s.y.clone()
    expand_how(s, v, how)
    delta = s.y.double() - y.double()
    s.y.copy_(y)
    return delta


def expand_variants(bench, linears, rank: int, l2_bytes: float) -> list[dict]:
    """One row per (linear, T, variant or candidate config); see the module docstring."""
    tokens = (1, 4) if bench.smoke else (1, 16, 64, 256)
    candidates = DECODE_CANDIDATES[:2] if bench.smoke else DECODE_CANDIDATES
    rows = []
    for linear, t in itertools.product(linears, tokens):
        make = functools.partial(bench.inputs, linear, [1] * t, [rank] * t, rank)
        s = make()
        floor = floor_bytes(s, [rank] * t)["expand"]
        num_sets = max(1, min(8, math.ceil(3 * l2_bytes / floor)))
        sets = [s] + [make() for _ in range(num_sets - 1)]
        vs = [sgmv.lora_shrink(u.x, u.lora_a, u.ranks, u.segments) for u in sets]
        hows = [{"variant": x} for x in VARIANTS]
        if t >= 64 or bench.smoke:
            hows += [{"config": c} for c in candidates]
        # Every delta before any timing adds into s.y.
        deltas = [_delta(s, vs[0], how) for how in hows]
        for how, delta in zip(hows, deltas, strict=True):
            cfg = how.get("config") or expand_config_for(
                s.y, s.linear.offsets, s.segments, how["variant"]
            )
            calls = [functools.partial(expand_how, u, w, how) for u, w in zip(sets, vs)]
            diff = (delta - deltas[0]).norm() / deltas[0].norm()
            graph = bench.timer.per_call(calls * max(1, 16 // num_sets))
            timed_eager = "variant" in how or graph is None
            rows.append(
                {
                    "linear": linear.name,
                    "num_tokens": t,
                    "how": how.get("variant", "candidate"),
                    "kernel": type(cfg).__name__,
                    "config": dataclasses.asdict(cfg),
                    "floor_us": bench.us_at_copy_bw(floor),
                    "graph_us": graph["per_call_us"] if graph else None,
                    "graph": graph,
                    "eager": eager(calls[0], bench.device) if timed_eager else None,
                    "delta_vs_per_block": float(diff),
                }
            )
        del sets, vs
    return rows


def print_variants(rows: list[dict]) -> None:
    """Per case: each variant's graph (eager) us and % of copy bandwidth; the best candidate."""

    def cell(row):
        t = (
            row["graph_us"]
            if row["graph_us"] is not None
            else row["eager"]["median_us"]
        )
        return t, f"{t:7.1f} ({100 * row['floor_us'] / t:3.0f}%)"

    print(
        "decode expand us (% of copy bw) | per_block      | multi_block    | best candidate"
    )
    for (name, t), group in itertools.groupby(
        rows, key=lambda r: (r["linear"], r["num_tokens"])
    ):
        group = list(group)
        line = f"   {name:<8} T={t:<4}| {cell(group[0])[1]} | {cell(group[1])[1]} |"
        if group[2:]:
            best = min(group[2:], key=lambda r: cell(r)[0])
            cfg = {k: v for k, v in best["config"].items() if v is not None}
            line += f" {cell(best)[1]} {cfg}"
        worst = max(r["delta_vs_per_block"] for r in group)
        print(line + f"  [max delta diff {worst:.1e}]")
