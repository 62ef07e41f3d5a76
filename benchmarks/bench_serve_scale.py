"""bench_serve_scale: loraplex serve with many adapters under Zipf traffic, on a GPU.

    PYTHONPATH=src python benchmarks/bench_serve_scale.py --out DIR [--smoke] [--sizes 8,128]

The server runs as `loraplex serve` in its own process (Llama-3.1-8B shapes, dummy weights,
bf16, 64 adapter slots of rank 16); the load generator (loraplex.loadgen) runs in this one.
Adapters: rank 16, alpha 32, all seven linears, bf16 (bench_serve_setup.py registers them).
Requests: 512-token prompts of random ids, 128 generated tokens (EOS ignored), streamed.

1. scale: with N in --sizes registered adapters (default 8, 128, 1024), Poisson arrivals at
   --rate with at most --concurrency in flight, adapter popularity Zipf(1.0) over the N:
   throughput per N, and its drop from the smallest N (issue 8: at most 10% from 8 to 1024).
2. eviction cliff: the same Poisson rate (--ttft-load x the smallest N's throughput) over
   active adapters that all fit the slots (slots / 2) and over twice the slots, uniform
   popularity: p50 TTFT of each and their ratio (issue 8: at most 3x).
3. fairness: two tenants at --fair-share x that throughput each, then one of them at ten
   times it: the other's p99 TTFT and errors (issue 8: at most +20%, no error).

Each phase also records the server's /metrics counters it moved (pool loads, evictions,
hits, admission bypasses, rejections). JSON with every figure goes to
DIR/bench_serve_scale-<card>-<date>.json; a short table is printed last. --smoke runs tiny
shapes on the CPU to check the plumbing only.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench_serve_setup import LLAMA_8B, SMOKE, register, write_model_dir
from loraplex.loadgen import (
    BenchConfig,
    LengthDist,
    WorkloadConfig,
    adapter_names,
    arun,
)
from server_waits import wait_brief

ADMIN_KEY = "bench-admin-key"
COUNTERS = (
    "loraplex_adapter_loads_total",
    "loraplex_adapter_evictions_total",
    "loraplex_adapter_hits_total",
    "loraplex_adapter_misses_total",
    "loraplex_admission_bypassed_total",
    "loraplex_admission_wait_seconds_bucket",
    "loraplex_admission_wait_seconds_sum",
    "loraplex_admission_wait_seconds_count",
    "loraplex_request_setup_seconds_bucket",
    "loraplex_request_setup_seconds_sum",
    "loraplex_request_setup_seconds_count",
    "loraplex_request_queue_time_seconds_bucket",
    "loraplex_request_queue_time_seconds_sum",
    "loraplex_request_queue_time_seconds_count",
    "loraplex_request_prefill_time_seconds_bucket",
    "loraplex_request_prefill_time_seconds_sum",
    "loraplex_request_prefill_time_seconds_count",
    "loraplex_request_delivery_seconds_bucket",
    "loraplex_request_delivery_seconds_sum",
    "loraplex_request_delivery_seconds_count",
    "loraplex_event_loop_lag_seconds_bucket",
    "loraplex_event_loop_lag_seconds_sum",
    "loraplex_event_loop_lag_seconds_count",
    "loraplex_rejections_total",
    "loraplex_adapter_pool_exhausted_total",
    "loraplex_engine_steps_total",
    "loraplex_engine_step_seconds_total",
    "loraplex_engine_step_tokens_total",
    "loraplex_engine_step_gpu_wait_seconds_total",
    "loraplex_adapter_load_seconds_sum",
    "loraplex_adapter_load_seconds_count",
    "loraplex_engine_thread_seconds_total",
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--sizes", default="8,128,1024", help="registered adapters per run")
    p.add_argument("--slots", type=int, default=64, help="--max-loras of the server")
    p.add_argument("--seqs", type=int, default=64, help="--max-num-seqs of the server")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--distinct", type=int, default=16, help="distinct adapter contents")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rate", type=float, default=40.0, help="scale phase, requests/s")
    p.add_argument("--concurrency", type=int, default=96, help="scale phase, at most")
    p.add_argument("--requests", type=int, default=400, help="scale phase, per N")
    p.add_argument("--ttft-requests", type=int, default=240)
    p.add_argument("--ttft-load", type=float, default=0.5)
    p.add_argument(
        "--fair-requests", type=int, default=48, help="steady tenant, per run"
    )
    p.add_argument("--fair-share", type=float, default=0.2)
    p.add_argument("--skip", default="", help="phases to skip: ttft, fairness")
    p.add_argument("--serve-args", default="", help="more `loraplex serve` options")
    p.add_argument("--commit", default=os.environ.get("LORAPLEX_COMMIT", "unknown"))
    if p.parse_args().smoke:  # small defaults; flags given still win
        p.set_defaults(sizes="2,4,8", slots=4, seqs=8, distinct=2, prompt_len=16)
        p.set_defaults(output_len=8, rate=20.0, requests=24, ttft_requests=16)
        p.set_defaults(fair_requests=8, concurrency=16)
    return p.parse_args()


def card_name() -> tuple[str, str]:
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            short = next(
                (c for c in ("h200", "h100", "a100") if c in name.lower()), "gpu"
            )
            return name, short
    except ImportError:
        pass
    return "cpu", "cpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`loraplex serve` in a child process; its log goes to a file in the output folder."""

    def __init__(self, args, model_dir: Path, data_dir: Path, log: Path) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = log.open("w")
        command = [sys.executable, "-m", "loraplex", "serve", str(model_dir)]
        command += ["--load-format", "dummy", "--port", str(port)]
        command += ["--data-dir", str(data_dir), "--served-model-name", "base"]
        command += ["--max-loras", str(args.slots), "--max-lora-rank", str(args.rank)]
        command += ["--max-cpu-loras", str(4 * args.slots)]
        command += ["--max-num-seqs", str(args.seqs), "--max-queued-requests", "4096"]
        command += ["--max-model-len", str(args.prompt_len + args.output_len + 64)]
        command += ["--max-concurrent-per-tenant", str(args.concurrency)]
        command += ["--adapter-wait-timeout", "120", "--shutdown-timeout", "5"]
        command += ["--device", "cpu", "--dtype", "float32"] if args.smoke else []
        command += ["--device", "cuda", "--dtype", "bfloat16"] if not args.smoke else []
        command += shlex.split(args.serve_args)
        env = {**os.environ, "LORAPLEX_ADMIN_KEY": ADMIN_KEY, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        started = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited; see {log}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > 900:
                raise RuntimeError(f"the server did not start in 15 min; see {log}")
            time.sleep(1)
        self.start_s = time.perf_counter() - started

    def counters(self) -> dict[str, float]:
        text = httpx.get(
            f"{self.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in COUNTERS:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                    out[f"{s.name}{{{labels}}}"] = s.value
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def workload(args, adapters, popularity, rate, seed) -> WorkloadConfig:
    return WorkloadConfig(
        base_model="base",
        adapters=tuple(adapters),
        popularity=popularity,
        prompt_len=LengthDist("fixed", args.prompt_len),
        output_len=LengthDist("fixed", args.output_len),
        vocab_size=(SMOKE if args.smoke else LLAMA_8B)["vocab_size"],
        request_rate=rate,
        seed=seed,
    )


def summary_of(config: BenchConfig) -> dict:
    return asyncio.run(arun(config)).summary


def measure(server: Server, configs: list[BenchConfig]) -> tuple[list[dict], dict]:
    """Run the configs at once, each but the last in a client process of its own (as
    tenants are: in one event loop, the other tenant's streams delayed this one's first
    tokens, probe_fairness.py); their summaries, and the server counters they moved."""
    before = server.counters()
    started = time.perf_counter()
    with ProcessPoolExecutor(
        max(1, len(configs) - 1), mp_context=mp.get_context("spawn")
    ) as pool:
        others = [pool.submit(summary_of, c) for c in configs[:-1]]
        last = summary_of(configs[-1])
        summaries = [f.result() for f in others] + [last]
    seconds = time.perf_counter() - started
    after = server.counters()
    moved = {
        k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k)
    }
    print(step_brief(moved, seconds), flush=True)
    if loads := load_brief(moved):
        print(loads, flush=True)
    if waits := wait_brief(moved):
        print(waits, flush=True)
    moved["phase_seconds"] = seconds
    return summaries, moved


def load_brief(moved: dict) -> str:
    """The adapter moves of one phase: per move, how many and their mean ms (disk_to_host on
    a loader thread, host_to_device on the pool's stream, slot_write on the engine thread)."""
    parts = []
    for move in ("disk_to_host", "host_to_device", "slot_write"):
        label = f"move={move}"
        count = sum(
            v
            for k, v in moved.items()
            if k.startswith("loraplex_adapter_load_seconds_count") and label in k
        )
        total = sum(
            v
            for k, v in moved.items()
            if k.startswith("loraplex_adapter_load_seconds_sum") and label in k
        )
        if count:
            parts.append(f"{move} {count:.0f} x {1e3 * total / count:.1f} ms")
    return "loads: " + ", ".join(parts) if parts else ""


def step_brief(moved: dict, seconds: float) -> str:
    """Where the engine thread's time went in one phase: per kind of step its count, mean
    wall ms, the host part of it (not waiting for the GPU) and its share of the phase; and
    the share spent handing outputs to the streams."""

    def total(name: str, label: str) -> float:
        return sum(v for k, v in moved.items() if k.startswith(name) and label in k)

    parts = []
    for kind in ("decode_graph", "decode_eager", "chunk_graph", "prefill"):
        steps = total("loraplex_engine_steps_total", f"kind={kind}")
        busy = total("loraplex_engine_step_seconds_total", f"kind={kind}")
        wait = total("loraplex_engine_step_gpu_wait_seconds_total", f"kind={kind}")
        if steps:
            parts.append(
                f"{kind} {steps:.0f} x {1e3 * busy / steps:.1f} ms"
                f" (host {1e3 * (busy - wait) / steps:.1f}; {100 * busy / seconds:.0f}%)"
            )
    dispatch = total("loraplex_engine_thread_seconds_total", "activity=dispatch")
    parts.append(f"dispatch {100 * dispatch / seconds:.0f}%")
    return "steps: " + ", ".join(parts)


def brief(summary: dict) -> dict:
    """The figures the table shows (the JSON keeps the whole summary)."""
    return {
        "req_s": summary["request_throughput"],
        "out_tok_s": summary["output_throughput"],
        "ttft_p50_ms": summary["ttft_ms"]["p50"],
        "ttft_p99_ms": summary["ttft_ms"]["p99"],
        "tpot_p50_ms": summary["tpot_ms"]["p50"],
        "errors": summary["errors"],
    }


def run(args, save) -> dict:
    """Every phase; `save(out)` is called after each, so a run cut short keeps its figures."""
    sizes = [int(n) for n in args.sizes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench_serve_scale-"))
    model_dir = write_model_dir(root / "model", SMOKE if args.smoke else LLAMA_8B)
    started = time.perf_counter()
    reg = register(
        root / "data",
        model_dir,
        {"scale": max(sizes + [2 * args.slots]), "steady": 8, "flood": 8},
        args.rank,
        args.distinct,
    )
    out: dict = {"setup_s": time.perf_counter() - started, "register_s": reg.seconds}
    server = Server(args, model_dir, root / "data", args.out / "bench_serve_scale.log")
    out["server_start_s"] = server.start_s
    print(f"server ready in {server.start_s:.0f} s", flush=True)

    def config(key, work, num, concurrency=None, label=""):
        return BenchConfig(
            server.url, (key,), work, num_requests=num, max_concurrency=concurrency,
            progress=False, label=label,
        )  # fmt: skip

    try:
        warm = workload(args, adapter_names("bench-", 8), "uniform", args.rate, 99)
        measure(server, [config(reg.keys["scale"], warm, min(64, args.requests))])
        out["scale"] = {}
        for n in sizes:
            work = workload(args, adapter_names("bench-", n), "zipf:1.0", args.rate, n)
            label = f"N={n}"
            (summary,), moved = measure(
                server,
                [
                    config(
                        reg.keys["scale"], work, args.requests, args.concurrency, label
                    )
                ],
            )
            out["scale"][n] = {"summary": summary, "server": moved}
            print(label, brief(summary), flush=True)
            save(out)
        first, last = out["scale"][sizes[0]], out["scale"][sizes[-1]]
        base_rate = first["summary"]["request_throughput"]
        out["scale_drop"] = 1 - last["summary"]["request_throughput"] / base_rate
        save(out)
        if "ttft" not in args.skip:
            out["ttft"] = cliff(args, server, reg, config, base_rate)
            save(out)
        if "fairness" not in args.skip:
            out["fairness"] = fairness(args, server, reg, config, base_rate)
    finally:
        server.stop()
    return out


def cliff(args, server, reg, config, base_rate) -> dict:
    """p50 TTFT with the active adapters all resident, and with twice the slots."""
    rate = args.ttft_load * base_rate
    result = {"rate": rate}
    for name, active in (
        ("resident", args.slots // 2),
        ("twice_slots", 2 * args.slots),
    ):
        names = adapter_names("bench-", active)
        if name == "resident":  # resident means loaded: not timing their first loads
            warm_up(server, config, reg.keys["scale"], args, names)
        work = workload(args, names, "uniform", rate, active)
        (summary,), moved = measure(
            server, [config(reg.keys["scale"], work, args.ttft_requests, label=name)]
        )
        result[name] = {"active": active, "summary": summary, "server": moved}
        print(name, brief(summary), flush=True)
    result["p50_ttft_ratio"] = (
        result["twice_slots"]["summary"]["ttft_ms"]["p50"]
        / result["resident"]["summary"]["ttft_ms"]["p50"]
    )
    return result


def warm_up(server, config, key, args, names) -> None:
    """Unmeasured requests, three per adapter drawn uniformly, 16 at a time, so that the
    adapters of a phase that must start resident are loaded (a few may be missed)."""
    work = workload(args, names, "uniform", args.rate, 7)
    measure(server, [config(key, work, 3 * len(names), 16)])


def fairness(args, server, reg, config, base_rate) -> dict:
    """The steady tenant's TTFT and errors, with the other at its share, then at 10x."""
    share = args.fair_share * base_rate
    names = adapter_names("bench-", 8)
    result = {"share_rate": share}
    # The phase before evicted these: the baseline must not time their loads from disk.
    for key in ("steady", "flood"):
        warm_up(server, config, reg.keys[key], args, names)
    for name, factor in (("equal", 1), ("flood", 10)):
        steady = workload(args, names, "uniform", share, 1)
        flood = workload(args, names, "uniform", share * factor, 2)
        summaries, moved = measure(
            server,
            [
                config(reg.keys["steady"], steady, args.fair_requests, label="steady"),
                config(reg.keys["flood"], flood, args.fair_requests * factor),
            ],
        )
        result[name] = {"steady": summaries[0], "other": summaries[1], "server": moved}
        print(name, "steady", brief(summaries[0]), "other", brief(summaries[1]))
    result["steady_p99_ttft_ratio"] = (
        result["flood"]["steady"]["ttft_ms"]["p99"]
        / result["equal"]["steady"]["ttft_ms"]["p99"]
    )
    result["steady_errors_in_flood"] = result["flood"]["steady"]["errors"]
    return result


def table(out: dict) -> str:
    rows = [f"server start {out['server_start_s']:.0f} s; setup {out['setup_s']:.0f} s"]
    rows.append(f"{'N':>6} {'req/s':>8} {'tok/s':>9} {'TTFT p50':>9} {'TPOT p50':>9}")
    for n, r in out["scale"].items():
        b = brief(r["summary"])
        rows.append(
            f"{n:>6} {b['req_s']:8.2f} {b['out_tok_s']:9.0f} {b['ttft_p50_ms']:9.1f}"
            f" {b['tpot_p50_ms']:9.2f}  errors {b['errors'] or 0}"
        )
    rows.append(f"throughput drop smallest→largest N: {100 * out['scale_drop']:.1f}%")
    if "ttft" in out:
        t = out["ttft"]
        rows.append(
            f"p50 TTFT all resident {brief(t['resident']['summary'])['ttft_p50_ms']:.1f} "
            f"ms, 2x slots {brief(t['twice_slots']['summary'])['ttft_p50_ms']:.1f} ms: "
            f"x{t['p50_ttft_ratio']:.2f} (target <= 3)"
        )
    if "fairness" in out:
        f = out["fairness"]
        rows.append(
            f"steady tenant p99 TTFT x{f['steady_p99_ttft_ratio']:.2f} with the other at "
            f"10x its share (target <= 1.2); its errors {f['steady_errors_in_flood']}"
        )
    return "\n".join(rows)


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device, card = card_name()
    date = datetime.date.today().isoformat()
    meta = {
        "device": device,
        "card": card,
        "date": date,
        "commit": args.commit,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    path = args.out / f"bench_serve_scale-{card}-{date}.json"

    def save(out: dict) -> None:
        path.write_text(json.dumps({**out, "meta": meta}, indent=1, default=str))

    out = run(args, save)
    save(out)
    print(f"wrote {path}")
    print(table(out))


if __name__ == "__main__":
    main()
