"""SGMV shrink/expand on Llama-3.1-8B shapes: time, byte floor, torch baselines (issue 3).

    PYTHONPATH=src python benchmarks/bench_sgmv.py OUT_DIR [--commit SHA] [--no-sweep]
        [--b-layout {rank_major,out_major,both}]
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/bench_sgmv.py OUT_DIR --smoke  # CPU

Cases: decode (T = 1, 16, 64, 256, one adapter per token) and prefill (T = 4096, 8192, runs of
512 tokens per adapter) for each LoRA linear of the 8B model (o, q/k/v, gate/up, down) at rank
16, bf16; mixed ranks {8, 16, 64} against the rank-weighted ideal of uniform runs; a sweep of
kernel configs; the launches LoRA adds to one decode step (32 layers x 4 linears); the per-block
and multi-block decode expands side by side (sgmv_variants.py). Writes
OUT_DIR/bench_sgmv-<card>-<date>.json with every raw timing and prints a short table last.
`--only expand_variants` runs only that section (any of the JSON's section keys may be named).

B is laid out as the engine's slot pool holds it, rank-major (kernels/sgmv/layout.py), except
in the mixed-ranks section, which by default runs every row (mixed and the uniform runs of its
ideal) under both layouts side by side, each row and case with its "b_layout":
`--b-layout rank_major` or `out_major` runs every section in that one layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import itertools
import json
import math
import sys
import traceback
from pathlib import Path

import torch

from loraplex.kernels import sgmv
from sgmv_timing import (
    B_LAYOUTS,
    LLAMA_8B,
    TINY,
    GraphTimer,
    LoraInputs,
    copy_bandwidth,
    eager,
    expand,
    floor_bytes,
    gather_bmm,
    lora_linear,
    make_inputs,
    segment_loop,
    shrink,
)
from sgmv_variants import expand_variants, print_variants

DTYPE = torch.bfloat16
RANK = 16
L2_BYTES = 50e6
GATHER_LIMIT_BYTES = 12e9  # the gather baseline materialises per-token A and B


class Bench:
    def __init__(
        self, device: torch.device, smoke: bool, b_layout: str = "rank_major"
    ) -> None:
        self.device, self.smoke = device, smoke
        self.dtype = torch.float16 if smoke else DTYPE  # numpy has no bf16
        self.b_layout = b_layout  # what every section but mixed_ranks runs
        self.timer = GraphTimer(device)
        self.copy = copy_bandwidth(device)
        self.cases: list[dict] = []

    def inputs(self, linear, runs, slot_ranks, max_rank, tile_tokens=64, b_layout=None):
        shape = (linear, runs, slot_ranks, max_rank, self.dtype, self.device)
        return make_inputs(*shape, tile_tokens, b_layout or self.b_layout)

    def us_at_copy_bw(self, num_bytes: float) -> float:
        return num_bytes / (self.copy["gbps"] * 1e3)

    def case(
        self,
        phase: str,
        linear,
        run_lengths: list[int],
        slot_ranks: list[int],
        max_rank: int,
        *,
        baselines: bool = True,
        b_layout: str | None = None,
    ) -> dict:
        make = functools.partial(
            self.inputs, linear, run_lengths, slot_ranks, max_rank, b_layout=b_layout
        )
        s = make()
        floors = floor_bytes(s, slot_ranks)
        rec = {
            "phase": phase,
            "linear": linear.name,
            "num_tokens": sum(run_lengths),
            "adapters": len(run_lengths),
            "max_rank": max_rank,
            "ranks": sorted(set(slot_ranks)),
            "b_layout": s.b_layout,
            "floor_bytes": floors,
            "floor_us": {k: self.us_at_copy_bw(b) for k, b in floors.items()},
        }
        v = sgmv.lora_shrink(s.x, s.lora_a, s.ranks, s.segments)
        rec["shrink_eager"] = eager(functools.partial(shrink, s), self.device)
        rec["expand_eager"] = eager(functools.partial(expand, s, v), self.device)
        rec["linear_eager"] = eager(functools.partial(lora_linear, s), self.device)
        # Graphs rotate over enough input sets that back-to-back calls do not run from L2.
        num_sets = max(1, min(8, math.ceil(3 * L2_BYTES / floors["linear"])))
        sets = [s] + [make() for _ in range(num_sets - 1)]
        repeat = max(1, 16 // num_sets)
        vs = [sgmv.lora_shrink(t.x, t.lora_a, t.ranks, t.segments) for t in sets]
        graphs = {
            "shrink": [functools.partial(shrink, t) for t in sets],
            "expand": [functools.partial(expand, t, v) for t, v in zip(sets, vs)],
            "linear": [functools.partial(lora_linear, t) for t in sets],
        }
        if phase == "decode":
            for path in ("fused", "split"):
                graphs[path] = [functools.partial(lora_linear, t, path) for t in sets]
        for name, calls in graphs.items():
            rec[f"{name}_graph"] = self.timer.per_call(calls * repeat)
        if baselines:
            rec.update(self.baselines(s, sets, slot_ranks, graph=phase == "decode"))
        self.cases.append(rec)
        return rec

    def baselines(self, s: LoraInputs, sets, slot_ranks, graph: bool) -> dict:
        scales = s.scales[:, 0].tolist()
        loop = functools.partial(segment_loop, ranks=list(slot_ranks), scales=scales)
        out = {"errors_vs_ours": {}}
        runners = {"loop": loop}
        per_token = s.x.shape[0] * (s.lora_a[0].numel() + s.lora_b[0].numel())
        if per_token * s.x.element_size() * 1.5 < GATHER_LIMIT_BYTES:
            runners["gather"] = gather_bmm
        ours = dataclasses.replace(s, y=s.y.clone())
        lora_linear(ours)
        for name, run in runners.items():  # all checks before any timing changes s.y
            theirs = dataclasses.replace(s, y=s.y.clone())
            run(theirs)
            err = (theirs.y.double() - ours.y.double()).norm() / ours.y.double().norm()
            out["errors_vs_ours"][name] = float(err)
        for name, run in runners.items():
            out[f"{name}_eager"] = eager(functools.partial(run, s), self.device)
            if graph:
                calls = [functools.partial(run, t) for t in sets]
                out[f"{name}_graph"] = self.timer.per_call(calls)
        return out


def decode_and_prefill(bench: Bench, linears) -> None:
    decode_tokens = (1, 4) if bench.smoke else (1, 16, 64, 256)
    prefill = ((32, 8), (64, 16)) if bench.smoke else ((4096, 512), (8192, 512))
    for linear in linears:
        for t in decode_tokens:
            bench.case("decode", linear, [1] * t, [RANK] * t, RANK)
        for t, run in prefill:
            bench.case("prefill", linear, [run] * (t // run), [RANK] * (t // run), RANK)


def mixed_ranks(bench: Bench, linears, layouts: tuple[str, ...]) -> list[dict]:
    """Ranks 8, 16, 64 in one batch (max_rank 64) against uniform runs at each rank, under
    each of `layouts` of B (the uniform runs of the ideal in the same layout as the mix)."""
    by_name = {lin.name: lin for lin in linears}
    shapes = [("decode", "o", 256, 1), ("decode", "qkv", 256, 1)]
    shapes.append(("prefill", "qkv", 8192, 512))
    if bench.smoke:
        shapes = [("decode", "qkv", 6, 1), ("prefill", "qkv", 64, 16)]
    out = []
    for (phase, name, t, run), layout in itertools.product(shapes, layouts):
        n = t // run
        mixed_ranks_of = [(8, 16, 64)[j % 3] for j in range(n)]
        case = functools.partial(
            bench.case, phase, by_name[name], baselines=False, b_layout=layout
        )
        mixed = case([run] * n, mixed_ranks_of, 64)
        uniform = {r: case([run] * n, [r] * n, r) for r in (8, 16, 64)}
        shares = {r: mixed_ranks_of.count(r) / n for r in (8, 16, 64)}
        row = {"phase": phase, "linear": name, "num_tokens": t, "b_layout": layout}
        row["shares"] = shares
        for mode in ("linear_eager", "linear_graph"):
            if mixed[mode] is None:
                continue
            key = "median_us" if mode == "linear_eager" else "per_call_us"
            ideal = sum(shares[r] * uniform[r][mode][key] for r in shares)
            row[mode] = {"mixed_us": mixed[mode][key], "ideal_us": ideal}
            row[mode]["ratio"] = mixed[mode][key] / ideal
        out.append(row)
    return out


def sweep(bench: Bench, linears) -> list[dict]:
    """Kernel configs around the defaults, timed in a graph (no host overhead), on the shapes
    that choose them; "default" rows are what the launchers pick by themselves."""
    from loraplex.kernels.sgmv.expand import ExpandConfig, sgmv_expand
    from loraplex.kernels.sgmv.fused import FusedConfig, sgmv_fused
    from loraplex.kernels.sgmv.shrink import ShrinkConfig, sgmv_shrink

    by_name = {lin.name: lin for lin in linears}
    shrink_decode = [ShrinkConfig(16, 256, k) for k in (1, 2, 4, 8, 16)]
    shrink_prefill = [ShrinkConfig(16, 128, 1, 4, 4), ShrinkConfig(64, 64, 1, 4, 4)]
    expand_prefill = [ExpandConfig(n, None, w) for n, w in ((64, 4), (256, 8))]
    fused = [FusedConfig(n, k) for n in (256, 512) for k in (128, 256)]
    plan = [  # kernel, linear, tokens, run length, configs, tile sizes
        ("shrink", "o", 1, 1, shrink_decode, (64,)),
        ("shrink", "qkv", 64, 1, shrink_decode, (64,)),
        ("fused", "gate_up", 1, 1, fused, (64,)),
        ("shrink", "qkv", 8192, 512, shrink_prefill, (32, 64, 128)),
        ("expand", "gate_up", 8192, 512, expand_prefill, (64,)),
    ]
    if bench.smoke:
        plan = [(k, "qkv", 16, 4, [], (16,)) for k in ("shrink", "expand", "fused")]
    launchers = {"shrink": sgmv_shrink, "expand": sgmv_expand, "fused": sgmv_fused}
    out = []
    for kernel, name, t, run, configs, tiles in plan:
        for tile_tokens in tiles:
            n = t // run
            s = bench.inputs(by_name[name], [run] * n, [RANK] * n, RANK, tile_tokens)
            v = sgmv.lora_shrink(s.x, s.lora_a, s.ranks, s.segments)
            offsets = s.linear.offsets
            if kernel == "shrink":
                args = (s.x, s.lora_a, s.ranks, s.segments)
            elif kernel == "expand":
                args = (s.y, v, s.lora_b, s.ranks, s.scales, offsets, s.segments)
            else:
                args = (s.y, s.x, s.lora_a, s.lora_b, s.ranks, s.scales, offsets)
                args = (*args, s.segments)
            for cfg in [None, *configs] if tile_tokens == 64 else [None]:
                fn = functools.partial(launchers[kernel], *args, config=cfg)
                timing = bench.timer.per_call([fn] * 8) or eager(fn, bench.device)
                out.append(
                    {
                        "kernel": kernel,
                        "linear": name,
                        "num_tokens": t,
                        "tile_tokens": tile_tokens,
                        "config": "default" if cfg is None else dataclasses.asdict(cfg),
                        "median_us": timing.get("per_call_us", timing.get("median_us")),
                    }
                )
    return out


def decode_step(bench: Bench, linears, num_layers: int) -> list[dict]:
    """The LoRA work of one decode step: every layer's four LoRA linears, own weights each."""
    out = []
    for t in (1, 4) if bench.smoke else (1, 64):
        step = [
            bench.inputs(linear, [1] * t, [RANK] * t, RANK)
            for _ in range(num_layers)
            for linear in linears
        ]

        def run_step(step=step):
            for s in step:
                lora_linear(s)

        rec = {"num_tokens": t, "adapters": t, "layers": num_layers}
        rec["lora_linears"] = len(step)
        rec["floor_bytes"] = sum(floor_bytes(s, [RANK] * t)["linear"] for s in step)
        rec["launches"] = count_launches(run_step, bench.device)
        rec["graph"] = bench.timer.per_call([run_step])
        if bench.timer.enabled:
            rec["launch_cost_us"] = (
                rec["launches"]["total"] * bench.timer.trivial_node_us
            )
        out.append(rec)
        del step
    return out


def count_launches(fn, device: torch.device) -> dict:
    """Kernels and memsets one call puts on the GPU, read from the profiler."""
    if device.type != "cuda":
        return {"total": 0}
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names: dict[str, int] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            names[event.name] = names.get(event.name, 0) + 1
    return {"total": sum(names.values()), "by_name": names}


def base_weight_floor_us(bench: Bench, linears, num_layers: int) -> float:
    """An FP8 decode step must read every base weight of the layers once (lm_head aside)."""
    params = sum(lin.in_features * sum(lin.widths) for lin in linears) * num_layers
    return bench.us_at_copy_bw(params)


def card_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for card in ("h200", "h100", "a100", "l40s"):
        if card in name:
            return card
    return "".join(c if c.isalnum() else "-" for c in name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument(
        "--b-layout",
        choices=(*B_LAYOUTS, "both"),
        help="B's layout: one of them for every section, or both side by side in the "
        "mixed-ranks section (default: both there, rank_major, the engine's, elsewhere)",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="SECTION", help="only these sections"
    )
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    torch.manual_seed(0)
    linears = TINY if args.smoke else LLAMA_8B
    num_layers = 2 if args.smoke else 32
    b_layout = args.b_layout or "both"
    mixed_layouts = B_LAYOUTS if b_layout == "both" else (b_layout,)
    bench = Bench(device, args.smoke, "rank_major" if b_layout == "both" else b_layout)
    import triton

    info = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": args.commit,
        "date": datetime.date.today().isoformat(),
        "dtype": str(bench.dtype),
        "copy_bandwidth": bench.copy,
    }
    if bench.timer.enabled:
        info["graph_replay_one_trivial"] = bench.timer.replay_one_trivial
        info["graph_trivial_node_us"] = bench.timer.trivial_node_us
    result = {
        "info": info,
        "config": {
            "rank": RANK,
            "linears": [dataclasses.asdict(x) for x in linears],
            "b_layout": bench.b_layout,  # of every section but mixed_ranks
            "mixed_ranks_b_layouts": list(mixed_layouts),
        },
        "cases": bench.cases,
        "mixed_ranks": [],
        "sweep": [],
        "decode_step": [],
        "expand_variants": [],
        "base_fp8_weight_floor_us": base_weight_floor_us(bench, linears, num_layers),
        "errors": [],
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"bench_sgmv-{card_name(device)}-{info['date']}.json"
    sections = [
        ("cases", lambda: decode_and_prefill(bench, linears)),
        ("mixed_ranks", lambda: mixed_ranks(bench, linears, mixed_layouts)),
        ("sweep", lambda: [] if args.no_sweep else sweep(bench, linears)),
        ("decode_step", lambda: decode_step(bench, linears, num_layers)),
        ("expand_variants", lambda: expand_variants(bench, linears, RANK, L2_BYTES)),
    ]
    for key, run in sections:
        if args.only and key not in args.only:
            continue
        # One failing section must not cost the others' numbers: GPU time is scarce.
        try:
            produced = run()
            if produced is not None:
                result[key] = produced
        except Exception:  # noqa: BLE001 - recorded in the JSON and printed
            result["errors"].append(
                {"section": key, "traceback": traceback.format_exc()}
            )
            print(result["errors"][-1]["traceback"], file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        path.write_text(json.dumps(result, indent=1))
    from sgmv_report import print_report

    print_report(result)
    print_variants(result["expand_variants"])
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
