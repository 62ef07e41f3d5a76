"""bench_api_overhead: what the serving layer costs around a GPU step, measured without a GPU.

    PYTHONPATH=src python benchmarks/bench_api_overhead.py --out DIR [--step-ms 10]
        [--streams 16,64,128] [--output-len 64]

`loraplex serve` runs in a child process with its model's forward replaced by a wait of
--step-ms with the GIL released, as a GPU step's sync is (benchmarks/fake_step/sitecustomize.py).
Everything else runs as served: HTTP and SSE, auth, admission, adapter pinning, the scheduler,
sampling, detokenization and the output streams. With C concurrent streams (all admitted at
once), an ideal server would decode C tokens every --step-ms: TPOT = --step-ms.

Per C it reports output tokens/s, TTFT p50, TPOT p50/p90, and from the
server's /metrics the mean wall time of decode and prefill steps (the wait plus the engine's
host work plus any time spent waiting for the GIL), how many prefill steps the C arrivals took
(requests reach the engine as fast as the HTTP side admits them), and the share of the run the
engine thread spent handing outputs to the streams. A server that keeps up shows TPOT near --step-ms at every C; one whose
event loop cannot keep up shows TPOT and the step's wall time growing with C.

Shapes are the tiny smoke model's, or with --layers N the Llama-3.1-8B widths over N layers
(the forward is faked, so they set the vocabulary and the adapters' size: 2.6 MB a layer);
adapters are rank 16 over all seven linears, drawn uniformly. With --slots below --adapters the
pool evicts and loads (columns "calls": the engine thread's share in slot writes and other calls
between steps; "loads": slot writes). The client runs in this process.
JSON goes to DIR/bench_api_overhead-<host>-<date>.json; a table is printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import tempfile
import time
from pathlib import Path

from bench_serve_setup import LLAMA_8B, SMOKE, register, write_model_dir
from loraplex.loadgen import (
    BenchConfig,
    LengthDist,
    WorkloadConfig,
    adapter_names,
    arun,
)
from provenance import git_commit
from serve_child import ServerProcess

FAKE_STEP = Path(__file__).resolve().parent / "fake_step"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", type=Path, required=True, help="folder for the JSON and log"
    )
    p.add_argument("--step-ms", type=float, default=10.0, help="the faked GPU step")
    p.add_argument("--streams", default="16,64,128", help="concurrent streams per run")
    p.add_argument("--per-stream", type=int, default=2, help="requests per stream")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--adapters", type=int, default=8, help="rank-16 adapters named")
    p.add_argument(
        "--slots", type=int, default=0, help="GPU adapter slots (default: --adapters)"
    )
    p.add_argument(
        "--layers",
        type=int,
        default=0,
        help="Llama-3.1-8B widths with this many layers (adapters of real per-layer size; "
        "default: the tiny smoke model)",
    )
    p.add_argument("--serve-args", default="", help="more `loraplex serve` options")
    return p.parse_args(argv)


def counter(samples: dict, name: str, label: tuple[str, str]) -> float:
    return sum(v for (n, labels), v in samples.items() if n == name and label in labels)


def engine_moved(before: dict, after: dict, seconds: float) -> dict:
    """Decode steps, their mean wall ms, and the dispatch share of the run."""

    def moved(name: str, label: tuple[str, str]) -> float:
        return counter(after, name, label) - counter(before, name, label)

    steps = {}
    for kind in ("decode_graph", "decode_eager", "chunk_graph", "prefill"):
        count = moved("loraplex_engine_steps_total", ("kind", kind))
        wall = moved("loraplex_engine_step_seconds_total", ("kind", kind))
        steps[kind] = {"steps": count, "mean_ms": 1e3 * wall / count if count else None}
    shares = {
        activity: moved("loraplex_engine_thread_seconds_total", ("activity", activity))
        / seconds
        for activity in ("dispatch", "calls", "idle")
    }
    loads = moved("loraplex_adapter_loads_total", ("move", "slot_write"))
    return {
        "steps": steps,
        "dispatch_share": shares["dispatch"],
        "thread_shares": shares,
        "slot_loads": loads,
    }


def run_streams(args, server: ServerProcess, key: str, streams: int) -> dict:
    work = WorkloadConfig(
        base_model="base",
        adapters=tuple(adapter_names("bench-", args.adapters)),
        prompt_len=LengthDist("fixed", args.prompt_len),
        output_len=LengthDist("fixed", args.output_len),
        vocab_size=args.shapes["vocab_size"],
        seed=streams,
    )
    config = BenchConfig(
        server.url,
        (key,),
        work,
        num_requests=streams * args.per_stream,
        max_concurrency=streams,
        progress=False,
        label=f"C={streams}",
    )
    before = server.samples()
    started = time.perf_counter()
    result = asyncio.run(arun(config))
    seconds = time.perf_counter() - started
    engine = engine_moved(before, server.samples(), seconds)
    summary = result.summary
    return {
        "streams": streams,
        "seconds": seconds,
        "output_tok_s": summary["output_throughput"],
        "tpot_ms": summary["tpot_ms"],
        "ttft_ms": summary["ttft_ms"],
        "errors": summary["errors"],
        "engine": engine,
    }


def table(rows: list[dict], step_ms: float) -> str:
    ideal = f"faked GPU step {step_ms} ms: an ideal server has TPOT and steps of {step_ms} ms"
    header = (
        f"{'C':>5} {'tok/s':>7} {'TTFT p50':>9} {'TPOT p50':>9} {'p90':>6}"
        f" {'decode step':>12} {'prefill steps':>17} {'dispatch':>9} {'calls':>6}"
        f" {'loads':>6}  errors"
    )
    lines = [ideal, header]
    for r in rows:
        decode = r["engine"]["steps"]["decode_graph"]
        prefill = r["engine"]["steps"]["prefill"]
        lines.append(
            f"{r['streams']:>5} {r['output_tok_s']:7.0f} {r['ttft_ms']['p50']:9.1f}"
            f" {r['tpot_ms']['p50']:9.2f} {r['tpot_ms']['p90']:6.2f}"
            f" {decode['mean_ms'] or 0:9.2f} ms"
            f" {prefill['steps']:4.0f} x {prefill['mean_ms'] or 0:6.2f} ms"
            f" {100 * r['engine']['dispatch_share']:8.1f}%"
            f" {100 * r['engine']['thread_shares']['calls']:5.1f}%"
            f" {r['engine']['slot_loads']:6.0f}  {r['errors'] or 0}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    streams = [int(c) for c in args.streams.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench_api_overhead-"))
    args.shapes = SMOKE
    if args.layers:
        args.shapes = {**LLAMA_8B, "num_hidden_layers": args.layers, "vocab_size": 512}
    model_dir = write_model_dir(root / "model", args.shapes)
    reg = register(root / "data", model_dir, {"t": args.adapters}, 16, args.adapters)
    os.environ["LORAPLEX_BENCH_FAKE_STEP_MS"] = str(args.step_ms)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(FAKE_STEP), os.environ.get("PYTHONPATH", "")]
    )
    options = {
        "--max-loras": args.slots or args.adapters,
        "--max-cpu-loras": args.adapters,
        "--max-lora-rank": 16,
        "--max-num-seqs": max(streams),
        "--max-queued-requests": 4096,
        "--max-model-len": args.prompt_len + args.output_len + 64,
        "--max-concurrent-per-tenant": 4 * max(streams),
        "--shutdown-timeout": 5,
    }
    server = ServerProcess(
        model_dir,
        root / "data",
        root / "tmp",
        args.out / "bench_api_overhead-server.log",
        options,
        smoke=True,
        extra=shlex.split(args.serve_args),
    )
    rows = []
    try:
        run_streams(args, server, reg.keys["t"], min(streams))  # warm every adapter
        for c in streams:
            rows.append(run_streams(args, server, reg.keys["t"], c))
            print(table(rows[-1:], args.step_ms).splitlines()[-1], flush=True)
    finally:
        server.stop()
    host = platform.node() or "host"
    date = datetime.date.today().isoformat()
    out = {
        "meta": {
            "host_cpus": os.cpu_count(),
            "date": date,
            "commit": os.environ.get("LORAPLEX_COMMIT") or git_commit(),
            "args": {k: str(v) for k, v in vars(args).items()},
        },
        "rows": rows,
    }
    path = args.out / f"bench_api_overhead-{host}-{date}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    print(table(rows, args.step_ms))


if __name__ == "__main__":
    main()
