"""probe_fairness: issue 8's tenant fairness against a faked GPU step, on the host alone.

    PYTHONPATH=src:tests python benchmarks/probe_fairness.py --out DIR [--rate 3] [--step-ms 7.5]
        [--token-us 11] [--steady-requests 60] [--serve-args "--switch-interval-ms 0.5"]

`loraplex serve` runs with its forward replaced by a wait that releases the GIL
(benchmarks/fake_step/sitecustomize.py): a decode step lasts --step-ms, a step with prompt
chunks --token-us more per token computed (the defaults are about what an H200 took at 2197e2c:
7.4 ms decode steps, ~30 ms for a 2048-token chunk step). Everything else runs as served: HTTP,
keys, admission and fair share, the pool, the scheduler, sampling, streams. Two tenants with 8
adapters each send 512-token prompts for 128 tokens: both at --rate requests/s, then one of them
at 10x. Printed and written to DIR/probe_fairness-<host>-<date>.json: the steady tenant's TTFT
p50/p99 in each phase, their ratio (issue 8: at most 1.2), and where its time went from the
server's histograms (admission, setup, engine queue, prefill, delivery). What a CPU host cannot
show is the GPU's own contention; what it shows is the serving layer's part of the tail.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import platform
import shlex
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench_api_overhead import FAKE_STEP
from bench_serve_scale import summary_of
from bench_serve_setup import SMOKE, register, write_model_dir
from loraplex.loadgen import (
    BenchConfig,
    LengthDist,
    WorkloadConfig,
    adapter_names,
    arun,
)
from provenance import git_commit
from serve_child import ServerProcess
from server_waits import wait_brief


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", type=Path, required=True, help="folder for the JSON and log"
    )
    p.add_argument("--rate", type=float, default=3.0, help="each tenant's requests/s")
    p.add_argument("--steady-requests", type=int, default=60, help="per phase")
    p.add_argument("--step-ms", type=float, default=7.5, help="a faked decode step")
    p.add_argument("--token-us", type=float, default=11.0, help="per prompt token")
    p.add_argument("--serve-args", default="", help="more `loraplex serve` options")
    p.add_argument(
        "--one-client",
        action="store_true",
        help="both tenants' requests from one client event loop (default: one process each)",
    )
    return p.parse_args(argv)


def flat(samples: dict) -> dict[str, float]:
    """serve_child's samples keyed as server_waits reads them: name{label=value,...}."""
    return {
        f"{name}{{{','.join(f'{k}={v}' for k, v in labels)}}}": value
        for (name, labels), value in samples.items()
    }


def phase(server, keys, factor: int, args) -> dict:
    """The steady tenant at --rate and the other at factor x --rate, at once."""

    def config(key, rate, requests, seed, label):
        work = WorkloadConfig(
            base_model="base",
            adapters=tuple(adapter_names("bench-", 8)),
            prompt_len=LengthDist("fixed", 512),
            output_len=LengthDist("fixed", 128),
            vocab_size=SMOKE["vocab_size"],
            request_rate=rate,
            seed=seed,
        )
        return BenchConfig(
            server.url, (key,), work, num_requests=requests, progress=False, label=label
        )

    before = flat(server.samples())
    steady = config(keys["steady"], args.rate, args.steady_requests, 1, "steady")
    other = config(
        keys["other"], factor * args.rate, factor * args.steady_requests, 2, "other"
    )

    if args.one_client:

        async def both():
            return await asyncio.gather(arun(steady), arun(other))

        steady_summary, other_summary = (r.summary for r in asyncio.run(both()))
    else:  # each tenant its own client process, as tenants are: no shared event loop
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            steady_run = pool.submit(summary_of, steady)
            other_summary = summary_of(other)
            steady_summary = steady_run.result()
    after = flat(server.samples())
    moved = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k)}
    return {
        "steady": steady_summary,
        "other": other_summary,
        "waits": wait_brief(moved),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="probe_fairness-"))
    model_dir = write_model_dir(root / "model", SMOKE)
    reg = register(root / "data", model_dir, {"steady": 8, "other": 8}, 16, 8)
    os.environ.update(
        LORAPLEX_BENCH_FAKE_STEP_MS=str(args.step_ms),
        LORAPLEX_BENCH_FAKE_TOKEN_US=str(args.token_us),
        LORAPLEX_BENCH_EAGER_CALLS="12",  # prompt steps replay mixed graphs on a GPU
        PYTHONPATH=os.pathsep.join([str(FAKE_STEP), os.environ.get("PYTHONPATH", "")]),
    )
    options = {
        "--max-loras": 16,
        "--max-lora-rank": 16,
        "--max-num-seqs": 64,
        "--max-model-len": 1024,
        "--max-concurrent-per-tenant": 96,
        "--max-queued-requests": 4096,
        "--shutdown-timeout": 5,
    }
    server = ServerProcess(
        model_dir,
        root / "data",
        root / "tmp",
        args.out / "probe_fairness-server.log",
        options,
        smoke=True,
        extra=shlex.split(args.serve_args),
    )
    out = {}
    try:
        phase(server, reg.keys, 1, args)  # unmeasured: every adapter loaded once
        for name, factor in (("equal", 1), ("flood", 10)):
            out[name] = phase(server, reg.keys, factor, args)
            ttft = out[name]["steady"]["ttft_ms"]
            print(f"{name}: steady TTFT p50 {ttft['p50']:.1f} p99 {ttft['p99']:.1f} ms")
            print(out[name]["waits"], flush=True)
    finally:
        server.stop()
    ratio = (
        out["flood"]["steady"]["ttft_ms"]["p99"]
        / out["equal"]["steady"]["ttft_ms"]["p99"]
    )
    out["steady_p99_ttft_ratio"] = ratio
    out["meta"] = {
        "host_cpus": os.cpu_count(),
        "date": datetime.date.today().isoformat(),
        "commit": os.environ.get("LORAPLEX_COMMIT") or git_commit(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    host = platform.node() or "host"
    path = args.out / f"probe_fairness-{host}-{out['meta']['date']}.json"
    path.write_text(json.dumps(out, indent=1))
    errors = out["flood"]["steady"]["errors"]
    print(f"wrote {path}")
    print(
        f"steady tenant p99 TTFT x{ratio:.2f} with the other at 10x (target <= 1.2); errors {errors}"
    )


if __name__ == "__main__":
    main()
