"""soak: loraplex serve under steady load with adapter churn for --minutes; are memory, file
handles, temp space and GPU memory flat, and were there no errors? (issue 8)

    PYTHONPATH=src python benchmarks/soak.py --out DIR [--minutes 30] [--load 0.7] [--smoke]

1. Setup: `loraplex serve` in a child process (Llama-3.1-8B shapes, `--load-format dummy`,
   bf16 on the GPU; tiny shapes in float32 on the CPU with --smoke) over a data dir holding
   --stable adapters (3 x --slots by default, so the pool evicts; --distinct contents, see
   bench_serve_setup.py), with --cpu-loras host entries (fewer than the adapters, so the host
   tier evicts too); then --window churn adapters uploaded through the API.
2. Capacity: a closed loop of 2 x --seqs streams over the stable adapters for --capacity-s;
   completed requests/s is the capacity (--rate skips this and gives the rate itself).
3. Soak: Poisson arrivals at --load x capacity for --minutes (512-token prompts of random ids,
   128 generated tokens, EOS ignored, streamed), --churn-share of them on churn adapters,
   while the churn uploads, replaces and deletes adapters (soak_traffic.py says how).
   Every --sample-every seconds: the server's VmRSS, threads, open descriptors (all, and
   without sockets), the size and file count of its data dir and of its temp folders (the
   data dir's tmp/ and the TMPDIR it runs with), GPU memory (nvidia-smi), the requests so
   far (ok, errors, refusals) and its in-flight gauges from /metrics.
4. Verdicts (soak_verdict.py states the flatness rule: last third's peak against the first
   third's, after a warm-up): one per resource, and
   - errors: requests that failed (any status or client error but a refusal, a stream cut
     short, a timeout; the capacity run's included), churn operations that failed, and the
     server's own adapter-load failures and aborted requests (nobody cancels here) from
     /metrics: must be 0;
   - refusals: 429 and 503 answered with Retry-After (backpressure, counted apart from
     errors). They count: at --load 0.7 of capacity, with a queue of 4096 and waits of 120 s
     allowed, the server has no reason to refuse; at most --max-refusal-share of requests;
   - skipped: arrivals not sent because --max-in-flight were pending (the server fell
     behind): must be 0;
   - idle: the in-flight gauges of /metrics (running, waiting, pinned slots, admission
     seats and tenant calls) read 0 within 60 s of the last request;
   - descriptors: once idle, the server's open descriptors (sockets included: they follow
     the load, so flatness does not judge them) are back to their count before the load,
     +8 at most;
   - complete: the soak ran its --minutes (not cut short by SIGTERM or SIGINT).
   The soak passes when every verdict passes ("n/a": not measured here, e.g. GPU memory on
   a CPU host); the exit status is 0 then, 1 otherwise.

JSON with every sample, the churn log, the latency summary and the verdicts goes to
DIR/soak-<card>-<date>.json (rewritten about every minute while it runs, so a run cut short
leaves its samples; "complete" says which); the server log to DIR/soak-server.log; a short
table is printed last. SIGTERM or SIGINT ends the soak early and still writes the verdicts.
--smoke runs about a minute on the CPU to check the plumbing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench_serve_setup import LLAMA_8B, SMOKE, register, write_model_dir
from loraplex.loadgen import (
    BaseShapes,
    BenchConfig,
    LengthDist,
    WorkloadConfig,
    adapter_names,
    arun,
    summarize,
)
from loraplex.loadgen.adapters import MODULES
from provenance import git_commit
from serve_child import ServerProcess, busy_gauges, card_name, serve_options
from soak_probe import GpuMemory, fds_settled, open_fds, sample_process
from soak_traffic import Churn, LiveSet, Traffic
from soak_verdict import count_verdict, overall, resource_verdicts, soak_table

COUNTERS = (  # the server's counters whose change over the soak is recorded
    "loraplex_rejections_total",
    "loraplex_adapter_pool_exhausted_total",
    "loraplex_adapter_load_failures_total",
    "loraplex_adapter_evictions_total",
    "loraplex_adapter_loads_total",
    "loraplex_uploads_total",
    "loraplex_admission_preempted_total",
    "vllm:request_success_total",
)
FD_SLACK = 8  # descriptors once idle, over the count before the load
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for JSON and log")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--minutes", type=float, default=30.0, help="soak length")
    p.add_argument("--load", type=float, default=0.7, help="fraction of capacity")
    p.add_argument("--rate", type=float, help="requests/s (skips the capacity run)")
    p.add_argument("--capacity-s", type=float, default=60.0)
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds")
    p.add_argument("--warmup-s", type=float, help="default: 20%% of the soak, <= 180")
    p.add_argument("--slots", type=int, default=64, help="--max-loras of the server")
    p.add_argument("--seqs", type=int, default=64, help="--max-num-seqs")
    p.add_argument("--cpu-loras", type=int, help="--max-cpu-loras (default 2 x slots)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--stable", type=int, help="stable adapters (default 3 x slots)")
    p.add_argument("--distinct", type=int, default=16, help="their distinct contents")
    p.add_argument("--window", type=int, default=8, help="churn adapters alive")
    p.add_argument("--churn-every", type=float, default=10.0, help="seconds per op")
    p.add_argument("--churn-share", type=float, default=0.2)
    p.add_argument("--delete-grace", type=float, default=60.0, help="seconds at most")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-in-flight", type=int, default=2048)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--max-refusal-share", type=float, default=0.0)
    p.add_argument("--serve-args", default="", help="more `loraplex serve` options")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):  # flags given still win
        p.set_defaults(minutes=0.75, capacity_s=6, sample_every=1.0, slots=4, seqs=8)
        p.set_defaults(distinct=2, window=4, churn_every=2.0, prompt_len=16, load=0.5)
        p.set_defaults(output_len=8, max_in_flight=256, request_timeout=60.0)
    args = p.parse_args(argv)
    args.cpu_loras = args.cpu_loras or 2 * args.slots
    args.stable = args.stable or 3 * args.slots
    duration = 60 * args.minutes
    args.warmup_s = (
        args.warmup_s if args.warmup_s is not None else min(180, duration / 5)
    )
    args.shapes = SMOKE if args.smoke else LLAMA_8B
    args.vocab_size = args.shapes["vocab_size"]
    return args


def adapter_bytes(shapes: BaseShapes, rank: int) -> int:
    """Bytes of one bf16 adapter on all seven linears (what the churn uploads)."""
    per_layer = sum(rank * sum(shapes.linear(module)) for module in MODULES)
    return 2 * per_layer * shapes.num_layers


def counters(samples: dict) -> dict[str, float]:
    out = {}
    for (name, labels), value in samples.items():
        if name in COUNTERS:
            out[name + "".join(f"{{{k}={v}}}" for k, v in labels)] = value
    return out


class Soak:
    """One soak against a running server; `result()` is the JSON."""

    def __init__(self, args, server: ServerProcess, key: str, model_dir: Path) -> None:
        self.args, self.server, self.key = args, server, key
        self.shapes = BaseShapes.from_model_dir(model_dir)
        self.gpu = GpuMemory(server.pid)
        self.temp_dirs = [server.data_dir / "tmp", server.temp_dir]
        self.live = LiveSet(adapter_names("soak-", args.stable))
        self.samples: list[dict] = []
        self.out: dict = {"complete": False, "interrupted": False}
        self.t0 = time.perf_counter()
        self.churn = Churn(server.url, key, self.shapes, self.live, args, self.t0)
        self.traffic: Traffic | None = None

    async def capacity(self) -> float:
        a = self.args
        work = WorkloadConfig(
            base_model="base", adapters=tuple(self.live.stable),
            prompt_len=LengthDist("fixed", a.prompt_len),
            output_len=LengthDist("fixed", a.output_len), vocab_size=a.vocab_size,
        )  # fmt: skip
        config = BenchConfig(
            self.server.url, (self.key,), work, num_requests=None,
            duration_s=a.capacity_s, max_concurrency=2 * a.seqs, progress=False,
        )  # fmt: skip
        summary = (await arun(config)).summary
        self.out["capacity"] = {
            k: summary[k] for k in ("completed", "failed", "errors", "duration_s")
        } | {"req_s": summary["request_throughput"]}
        return summary["request_throughput"]

    async def run(self, stop: asyncio.Event) -> None:
        a = self.args
        self.out["fds_before"] = open_fds(self.server.pid).get("open_fds", 0)
        started = time.perf_counter()
        await self.churn.fill()
        self.out["churn_fill_s"] = time.perf_counter() - started
        rate = a.rate or a.load * await self.capacity()
        if rate <= 0:
            raise RuntimeError(f"no rate to soak at: capacity {self.out['capacity']}")
        self.out["rate"] = rate
        print(f"soak: {rate:.2f} req/s for {a.minutes:g} min", flush=True)
        before = counters(await asyncio.to_thread(self.server.samples))
        self.t0 = self.churn.t0 = time.perf_counter()
        self.traffic = Traffic(self.server.url, self.key, self.live, rate, a, seed=1)
        tasks = [
            asyncio.create_task(self.traffic.run(stop)),
            asyncio.create_task(self.churn.run(stop)),
            asyncio.create_task(self._sample_until(stop)),
        ]
        try:
            await asyncio.wait_for(stop.wait(), 60 * a.minutes)
        except TimeoutError:
            pass
        self.out["soak_s"] = time.perf_counter() - self.t0
        stop.set()
        await asyncio.gather(*tasks)
        self.out["drain_s"] = time.perf_counter() - self.t0 - self.out["soak_s"]
        busy, waited = await asyncio.to_thread(self.server.wait_idle, 60.0)
        self.out["fds_after"] = await asyncio.to_thread(
            fds_settled, self.server.pid, self.out["fds_before"], FD_SLACK
        )
        after = await asyncio.to_thread(self.server.samples)
        self.out["idle"] = {"busy": busy, "waited_s": waited}
        self.out["after"] = await self._sample(final=True)
        moved = counters(after)
        self.out["server_counters"] = {
            k: v - before.get(k, 0.0) for k, v in moved.items() if v != before.get(k)
        }
        self.out["complete"] = not self.out["interrupted"]

    async def _sample_until(self, stop: asyncio.Event) -> None:
        written = -float("inf")  # the first sample, then about every minute
        while not stop.is_set():
            self.samples.append(await self._sample())
            if time.perf_counter() - written > 60:
                self.write(final=False)
                written = time.perf_counter()
            try:
                await asyncio.wait_for(stop.wait(), self.args.sample_every)
            except TimeoutError:
                pass

    async def _sample(self, final: bool = False) -> dict:
        t = time.perf_counter() - self.t0
        row = {"t": round(t, 2)}
        row |= await asyncio.to_thread(
            sample_process, self.server.pid, self.server.data_dir, self.temp_dirs,
            self.gpu,
        )  # fmt: skip
        if self.traffic is not None:
            row |= self.traffic.tally.counts()
        row |= {"churn_ops": len(self.churn.ops), "churn_failed": self.churn.failed}
        try:
            metrics = await asyncio.to_thread(self.server.samples, 10.0)
            for (name, _), value in metrics.items():
                if name in GAUGES:
                    row[name.split(":")[-1]] = value
            row["busy_gauges"] = len(busy_gauges(metrics)) if final else None
        except Exception as exc:  # noqa: BLE001 - a failed scrape is a sample too
            row["metrics_error"] = repr(exc)[:200]
        row["server_alive"] = self.server.alive
        return row

    def result(self, final: bool = True) -> dict:
        """The JSON; the latency summary only when `final` (it reads every record)."""
        a, tally = self.args, self.traffic.tally if self.traffic else None
        out = dict(self.out)
        out["warmup_s"] = a.warmup_s
        out["samples"] = self.samples
        out["churn_ops"] = self.churn.ops
        out["gpu_memory_source"] = self.gpu.source
        verdicts = resource_verdicts(
            self.samples, a.warmup_s, adapter_bytes(self.shapes, a.rank)
        )
        if tally is not None:
            out["requests"] = {
                **tally.counts(),
                "errors_by_outcome": dict(tally.errors),
                "refusals_by_status": dict(tally.refusals),
                "first_errors": tally.messages,
            }
            duration = out.get("soak_s") or (time.perf_counter() - self.t0)
            if final:
                summary = summarize(tally.records, duration, {})
                out["summary"] = {k: v for k, v in summary.items() if k != "by_tenant"}
            server = out.get("server_counters", {})
            server_errors = sum(
                v for k, v in server.items()
                if k.startswith("loraplex_adapter_load_failures_total")
                or "finished_reason=abort" in k
            )  # fmt: skip
            errors = tally.counts()["errors"] + self.churn.failed + int(server_errors)
            errors += self.out.get("capacity", {}).get("failed", 0)
            verdicts["errors"] = count_verdict(
                errors, 0, "failed requests, churn ops and server failures"
            )
            refusals = tally.counts()["refusals"]
            verdicts["refusals"] = count_verdict(
                refusals, int(a.max_refusal_share * tally.sent), "429/503 refusals"
            )
            verdicts["skipped"] = count_verdict(tally.skipped, 0, "arrivals not sent")
        if "idle" in out:
            busy = out["idle"]["busy"]
            verdicts["idle"] = count_verdict(len(busy), 0, "gauges not back to 0")
            verdicts["descriptors"] = count_verdict(
                out["fds_after"], out["fds_before"] + FD_SLACK,
                f"open fds once idle (before the load: {out['fds_before']})",
            )  # fmt: skip
        verdicts["complete"] = count_verdict(
            int(not out["complete"]), 0, "runs cut short (SIGTERM, SIGINT, a crash)"
        )
        out["verdicts"] = verdicts
        out["verdict"] = overall(verdicts)
        out["meta"] = self.meta
        return out

    def write(self, final: bool = True) -> Path:
        path = self.args.out / f"soak-{self.meta['card']}-{self.meta['date']}.json"
        partial = path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(self.result(final), indent=1, default=str))
        partial.replace(path)
        return path


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device, card = card_name()
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    model_dir = write_model_dir(root / "model", args.shapes)
    reg = register(
        root / "data", model_dir, {"soak": args.stable}, args.rank, args.distinct,
        prefix="soak-", log=lambda _: None,
    )  # fmt: skip
    server = ServerProcess(
        model_dir, root / "data", root / "server-tmp", args.out / "soak-server.log",
        serve_options(args, 4096), args.smoke, shlex.split(args.serve_args),
    )  # fmt: skip
    print(f"server ready in {server.start_s:.0f} s (pid {server.pid})", flush=True)
    soak = Soak(args, server, reg.keys["soak"], model_dir)
    soak.meta = {
        "device": device, "card": card, "commit": git_commit(),
        "date": datetime.date.today().isoformat(), "server_start_s": server.start_s,
        "server_command": server.command[2:],
        "args": {k: str(v) for k, v in vars(args).items() if k != "shapes"},
    }  # fmt: skip

    async def go() -> None:
        stop = asyncio.Event()

        def interrupt() -> None:
            soak.out["interrupted"] = True
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, interrupt)
        await soak.run(stop)

    try:
        asyncio.run(go())
    finally:
        soak.out["server_exit"] = server.stop()
        path = soak.write()
        shutil.rmtree(root, ignore_errors=True)
    result = json.loads(path.read_text())
    print(f"wrote {path}")
    print(soak_table(result))
    return 0 if result["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
