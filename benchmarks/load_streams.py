"""load_streams: --streams concurrent streaming clients against loraplex serve, each sending
--per-stream requests one after the other over many adapters; zero errors, TTFT/ITL
percentiles, and the server idle again at the end. (issue 8: "256 concurrent streams, zero
errors")

    PYTHONPATH=src python benchmarks/load_streams.py --out DIR [--streams 256] [--smoke]

The server runs as `loraplex serve` in a child process (Llama-3.1-8B shapes, dummy weights,
bf16 on the GPU, --seqs running at once and the rest queued; tiny shapes in float32 on the
CPU with --smoke). --tenants tenants each own --adapters adapters (rank 16, all seven
linears; --distinct contents, bench_serve_setup.py), so tenants x adapters adapter ids go
through --slots GPU slots. Stream i is a client of tenant i mod --tenants with its own
connection; all streams start at once, and each request names one of its tenant's adapters
drawn by --popularity (Zipf 1.0), with 512-token prompts of random ids and 128 generated
tokens (EOS ignored). /metrics and /proc/<pid> are sampled every --sample-every s meanwhile.

Verdicts (the exit status is 0 when all pass, else 1):
- errors: requests that failed (any status or client error but a refusal, a stream cut
  short, a timeout), and the server's adapter-load failures and aborted requests: 0;
- refusals: 429/503 with Retry-After, counted apart from errors. They count: the server is
  set to queue every stream (queue 4096, per-tenant cap above the streams, adapter waits up
  to 120 s), so at most --max-refusal-share of the requests;
- concurrency: the most calls the server held at once (admitted or waiting, summed over
  the tenants on /metrics) is at least 90% of --streams, i.e. the streams really were concurrent;
- idle: within 60 s of the last answer the in-flight gauges (running, waiting, pinned
  slots, admission seats and tenant calls) read 0;
- descriptors: the server's open descriptors are back to what they were before the load
  (+8), sockets included.
JSON with the summary, the samples and the verdicts goes to
DIR/load_streams-<card>-<date>.json, the server log to DIR/load_streams-server.log.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench_serve_setup import LLAMA_8B, SMOKE, register, write_model_dir
from loraplex.loadgen import RequestSpec, adapter_names, popularity_weights, summarize
from loraplex.loadgen.client import request_body, send
from loraplex.loadgen.workload import WeightedChoice
from provenance import git_commit
from serve_child import ServerProcess, card_name, serve_options
from soak_probe import fds_settled, open_fds, proc_status
from soak_traffic import Tally
from soak_verdict import count_verdict, overall, verdict_table

FD_SLACK = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for JSON and log")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--per-stream", type=int, default=4, help="requests per stream")
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--adapters", type=int, default=64, help="per tenant")
    p.add_argument("--popularity", default="zipf:1.0")
    p.add_argument("--slots", type=int, default=64, help="--max-loras of the server")
    p.add_argument("--seqs", type=int, default=128, help="--max-num-seqs")
    p.add_argument("--cpu-loras", type=int, default=128, help="--max-cpu-loras")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--distinct", type=int, default=16, help="distinct adapter contents")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--warmup-requests", type=int, default=16)
    p.add_argument("--sample-every", type=float, default=0.5, help="seconds")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--max-refusal-share", type=float, default=0.0)
    p.add_argument("--serve-args", default="", help="more `loraplex serve` options")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):  # flags given still win
        p.set_defaults(streams=32, per_stream=3, tenants=2, adapters=8, slots=4)
        p.set_defaults(seqs=8, cpu_loras=8, distinct=2, prompt_len=16, output_len=8)
        p.set_defaults(warmup_requests=4, request_timeout=120.0)
    args = p.parse_args(argv)
    args.shapes = SMOKE if args.smoke else LLAMA_8B
    return args


class Streams:
    """The streams, and a sampler of the server while they run."""

    def __init__(self, args, server: ServerProcess, keys: list[str]) -> None:
        self.args, self.server, self.keys = args, server, keys
        self.names = adapter_names("load-", args.adapters)
        self.choice = WeightedChoice(popularity_weights(args.popularity, args.adapters))
        self.tally = Tally()
        self.samples: list[dict] = []
        self.started = time.perf_counter()

    def spec(self, rng: random.Random, index: int, tenant: int) -> RequestSpec:
        a = self.args
        model = self.names[self.choice.draw(rng)]
        prompt = [rng.randrange(a.shapes["vocab_size"]) for _ in range(a.prompt_len)]
        return RequestSpec(index, tenant, model, "hot", prompt, None, a.output_len, 0.0)

    async def stream(self, number: int, requests: int, tally: Tally) -> None:
        rng = random.Random(number)
        tenant = number % len(self.keys)
        timeout = httpx.Timeout(self.args.request_timeout, connect=30.0)
        async with httpx.AsyncClient(timeout=timeout) as client:
            for i in range(requests):
                spec = self.spec(rng, number * requests + i, tenant)
                options = {"temperature": 0, "ignore_eos": True}
                body = request_body(spec, "completions", options)
                tally.sent += 1
                record = await send(
                    client, f"{self.server.url}/v1/completions", self.keys[tenant],
                    spec, body, self.started,
                )  # fmt: skip
                tally.add(record)

    async def run(self) -> float:
        """All streams at once; the wall time of the load."""
        a = self.args
        warm = Tally()
        await asyncio.gather(
            *(self.stream(10_000 + i, 1, warm) for i in range(a.warmup_requests))
        )
        self.warmup = warm.counts()
        stop = asyncio.Event()
        sampler = asyncio.create_task(self.sample_until(stop))
        self.started = time.perf_counter()
        await asyncio.gather(
            *(self.stream(i, a.per_stream, self.tally) for i in range(a.streams))
        )
        duration = time.perf_counter() - self.started
        stop.set()
        await sampler
        return duration

    async def sample_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.samples.append(await asyncio.to_thread(self.sample))
            try:
                await asyncio.wait_for(stop.wait(), self.args.sample_every)
            except TimeoutError:
                pass

    def sample(self) -> dict:
        row = {"t": round(time.perf_counter() - self.started, 2)}
        row |= proc_status(self.server.pid) | open_fds(self.server.pid)
        try:
            calls = 0.0
            for (name, _), value in self.server.samples(10.0).items():
                if name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
                    row[name.split(":")[-1]] = value
                calls += value if name == "loraplex_admission_tenant_calls" else 0
            row["calls"] = calls  # admitted or waiting, every tenant
        except Exception as exc:  # noqa: BLE001 - a failed scrape is a sample too
            row["metrics_error"] = repr(exc)[:200]
        row |= self.tally.counts()
        return row


def server_errors(before: dict, after: dict) -> int:
    moved = 0.0
    for (name, labels), value in after.items():
        if name == "loraplex_adapter_load_failures_total" or (
            name == "vllm:request_success_total"
            and ("finished_reason", "abort") in labels
        ):
            moved += value - before.get((name, labels), 0.0)
    return int(moved)


def measure(args, server: ServerProcess, keys: list[str]) -> dict:
    baseline = open_fds(server.pid).get("open_fds", 0)
    before = server.samples()
    streams = Streams(args, server, keys)
    duration = asyncio.run(streams.run())
    busy, waited = server.wait_idle(60.0)
    fds_after = fds_settled(server.pid, baseline, FD_SLACK)
    after = server.samples()
    tally, n = streams.tally, args.streams
    peak = max((s.get("calls", 0) for s in streams.samples), default=0)
    summary = summarize(tally.records, duration, {})
    verdicts = {
        "errors": count_verdict(
            tally.counts()["errors"] + server_errors(before, after), 0,
            "failed requests and server failures",
        ),
        "refusals": count_verdict(
            tally.counts()["refusals"], int(args.max_refusal_share * tally.sent),
            "429/503 refusals",
        ),
        "concurrency": {
            "verdict": "pass" if peak >= 0.9 * n else "fail", "count": int(peak),
            "allowed": f">= {0.9 * n:.0f}", "what": "calls held at once (peak)",
        },
        "idle": count_verdict(len(busy), 0, "gauges not back to 0"),
        "descriptors": count_verdict(
            fds_after, baseline + FD_SLACK, f"open fds after (before: {baseline})"
        ),
    }  # fmt: skip
    return {
        "duration_s": duration,
        "warmup": streams.warmup,
        "requests": {
            **tally.counts(),
            "errors_by_outcome": dict(tally.errors),
            "refusals_by_status": dict(tally.refusals),
            "first_errors": tally.messages,
        },
        "summary": summary,
        "peak_calls_held": peak,
        "idle": {"busy": busy, "waited_s": waited},
        "open_fds": {"before": baseline, "after": fds_after},
        "samples": streams.samples,
        "verdicts": verdicts,
        "verdict": overall(verdicts),
    }


def table(out: dict) -> str:
    s, r, a = out["summary"], out["requests"], out["meta"]["args"]
    rows = [f"load_streams: {out['verdict'].upper()}  ({out['meta']['device']})"]
    rows.append(
        f"{a['streams']} streams x {a['per_stream']} requests over {a['tenants']} tenants"
        f" x {a['adapters']} adapters, {a['slots']} slots, {a['seqs']} seqs: "
        f"{out['duration_s']:.1f} s, {s['request_throughput']:.2f} req/s, "
        f"{s['output_throughput']:.0f} tok/s"
    )
    rows.append(
        f"ok {r['ok']}, errors {r['errors']} {r['errors_by_outcome'] or ''}, "
        f"refusals {r['refusals']} {r['refusals_by_status'] or ''}"
    )
    for key in ("ttft", "itl", "tpot", "e2el"):
        m = s[f"{key}_ms"]
        rows.append(
            f"{key.upper():<5} ms  p50 {m['p50'] or 0:9.1f}  p90 {m['p90'] or 0:9.1f}"
            f"  p99 {m['p99'] or 0:9.1f}"
        )
    rows += verdict_table(out["verdicts"])
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device, card = card_name()
    root = Path(tempfile.mkdtemp(prefix="load_streams-"))
    tenants = {f"tenant{i}": args.adapters for i in range(args.tenants)}
    try:
        model_dir = write_model_dir(root / "model", args.shapes)
        reg = register(
            root / "data", model_dir, tenants, args.rank, args.distinct,
            prefix="load-", log=lambda _: None,
        )  # fmt: skip
        server = ServerProcess(
            model_dir, root / "data", root / "server-tmp",
            args.out / "load_streams-server.log", serve_options(args, args.streams), args.smoke,
            shlex.split(args.serve_args),
        )  # fmt: skip
        print(f"server ready in {server.start_s:.0f} s (pid {server.pid})", flush=True)
        try:
            out = measure(args, server, [reg.keys[t] for t in tenants])
        finally:
            exit_status = server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["server_exit"] = exit_status
    out["meta"] = {
        "device": device, "card": card, "commit": git_commit(),
        "date": datetime.date.today().isoformat(), "server_start_s": server.start_s,
        "server_command": server.command[2:],
        "args": {k: str(v) for k, v in vars(args).items() if k != "shapes"},
    }  # fmt: skip
    path = args.out / f"load_streams-{card}-{out['meta']['date']}.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path}")
    print(table(out))
    return 0 if out["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
