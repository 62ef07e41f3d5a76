"""`loraplex bench serve` and `loraplex bench adapters`: their options and what they run.

cli.py calls `add_bench_parser` and `run_bench`; nothing here imports the engine, and the
heavy imports (httpx, numpy) wait until a command runs.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _names(text: str) -> list[str]:
    return [n for n in text.split(",") if n]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def add_bench_parser(sub) -> None:
    """Add `bench serve` and `bench adapters` to the CLI's subparsers."""
    bench = sub.add_parser(
        "bench",
        help="load-test a running server, or fill it with random adapters",
        description="serve: send an OpenAI-API workload to a running server and report "
        "throughput, latency percentiles, goodput and errors. adapters: generate random "
        "PEFT adapters for the base model and upload them.",
    )
    inner = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    _add_serve(inner)
    _add_adapters(inner)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base-url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})"
    )
    p.add_argument(
        "--api-key",
        action="append",
        required=True,
        help="a tenant's API key; repeat for several tenants (each one is a tenant)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per request (default 600)"
    )


def _add_serve(inner) -> None:
    p = inner.add_parser(
        "serve",
        help="send a workload and report throughput, latencies, goodput and errors",
        description="Stream requests to /v1/completions or /v1/chat/completions at a "
        "Poisson or constant rate, or at a fixed concurrency, spread over adapters by "
        "popularity and over tenants by weight. Reports request and token throughput, "
        "TTFT, TPOT, ITL and end-to-end latency (mean, P50, P90, P99), goodput under SLOs "
        "and failed requests by status. Lengths are N, uniform:LOW:HIGH or "
        "normal:MEAN:STD tokens.",
    )
    _common(p)
    p.add_argument(
        "--endpoint",
        choices=["completions", "chat"],
        default="completions",
        help="which API to call (default completions)",
    )
    p.add_argument(
        "--model",
        default="",
        help="the base model's name (default: the one /v1/models lists)",
    )
    g = p.add_argument_group("adapters")
    g.add_argument(
        "--adapters", type=_names, default=[], help="adapter names, comma-separated"
    )
    g.add_argument(
        "--num-adapters",
        type=int,
        default=0,
        help="use PREFIX0..PREFIX{N-1}, as `bench adapters` names them",
    )
    g.add_argument(
        "--adapter-prefix",
        default="bench-",
        help="name prefix for --num-adapters/--num-cold-adapters (default bench-)",
    )
    g.add_argument(
        "--popularity",
        default="uniform",
        help="uniform, skewed (Zipf 1.0), single (all on the first) or zipf:ALPHA "
        "(default uniform)",
    )
    g.add_argument(
        "--cold-share",
        type=float,
        default=0.0,
        help="share of requests for cold adapters, used in turn (default 0)",
    )
    g.add_argument(
        "--num-cold-adapters",
        type=int,
        default=0,
        help="cold adapters: the names after the hot ones (PREFIX{N}..)",
    )
    g.add_argument(
        "--cold-adapters",
        type=_names,
        default=[],
        help="cold adapter names, comma-separated",
    )
    g.add_argument(
        "--base-share",
        type=float,
        default=0.0,
        help="share of requests for the base model (default 0; all when no adapters)",
    )
    g.add_argument(
        "--tenant-weights",
        type=_floats,
        default=[],
        help="relative load of each --api-key, comma-separated (default equal); the "
        "tenants share this client's event loop, so to measure fairness between tenants "
        "run one `loraplex bench serve` per tenant",
    )
    g = p.add_argument_group("load")
    g.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help="requests to send (default 100, or no bound with --duration)",
    )
    g.add_argument(
        "--duration", type=float, default=None, help="stop sending after S seconds"
    )
    g.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests per second (default inf: all at once, or --max-concurrency)",
    )
    g.add_argument(
        "--arrival",
        choices=["poisson", "constant"],
        default="poisson",
        help="gaps between arrivals: exponential or equal (default poisson)",
    )
    g.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="requests in flight at most; with an infinite rate, a fixed concurrency",
    )
    g = p.add_argument_group("requests")
    g.add_argument(
        "--prompt-len",
        default="32",
        help="prompt tokens: N, uniform:LOW:HIGH or normal:MEAN:STD (default 32)",
    )
    g.add_argument(
        "--output-len",
        default="32",
        help="tokens to generate, same forms (default 32)",
    )
    g.add_argument(
        "--vocab-size",
        type=int,
        default=0,
        help="send prompts as random token ids below this (exact lengths; completions "
        "only); default: text of common words, about one token each",
    )
    g.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="JSONL of {prompt: text or ids} or {messages: [...]}, optional output_len",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature (default 0)",
    )
    g.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="stop at EOS (default: generate exactly the output length)",
    )
    g = p.add_argument_group("report")
    g.add_argument(
        "--goodput",
        nargs="+",
        default=[],
        metavar="METRIC:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:50 (metrics ttft, tpot, e2el)",
    )
    g.add_argument("--result-json", type=Path, default=None, help="write results here")
    g.add_argument(
        "--save-itl",
        action="store_true",
        help="keep every inter-token gap in the JSON",
    )
    g.add_argument("--label", default="", help="a title for the table and the JSON")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--fail-on-error",
        action="store_true",
        help="exit 1 when any request failed",
    )


def _add_adapters(inner) -> None:
    p = inner.add_parser(
        "adapters",
        help="generate random PEFT adapters for the base model and upload them",
        description="Write COUNT random LoRA adapters (adapter_config.json + "
        "adapter_model.safetensors) shaped for the base model's config.json and upload "
        "each to every --api-key's tenant as PREFIX{START}, PREFIX{START+1}, ...",
    )
    _common(p)
    p.add_argument(
        "--model",
        type=Path,
        required=True,
        help="the base model's directory (its config.json gives the shapes)",
    )
    p.add_argument("--count", type=int, required=True, help="adapters to upload")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument(
        "--alpha", type=float, default=None, help="lora_alpha (default 2 x rank)"
    )
    p.add_argument("--prefix", default="bench-", help="name prefix (default bench-)")
    p.add_argument("--start", type=int, default=0, help="first number (default 0)")
    p.add_argument(
        "--distinct",
        type=int,
        default=None,
        help="different contents to cycle through (default: all different)",
    )
    p.add_argument(
        "--targets",
        type=_names,
        default=_names(TARGETS),
        help=f"target modules, comma-separated (default {TARGETS})",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="tensor dtype (default bfloat16)",
    )
    p.add_argument(
        "--concurrency", type=int, default=4, help="uploads at once (default 4)"
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="store a new version of names that exist (default: skip them)",
    )


def run_bench(args: argparse.Namespace) -> int:
    """Run `bench serve` or `bench adapters`; bad options end with status 2."""
    try:
        if args.bench_command == "adapters":
            return _run_adapters(args)
        config = serve_config(args)
    except (ValueError, OSError) as exc:
        print(f"loraplex bench {args.bench_command}: {exc}", file=sys.stderr)
        return 2
    import httpx

    from .runner import run_benchmark

    try:
        result = run_benchmark(config)
    except httpx.HTTPError as exc:
        # Only the model lookup raises; the requests' own errors are recorded.
        print(f"loraplex bench serve: cannot list the models: {exc}", file=sys.stderr)
        return 1
    print(result.table())
    if args.result_json:
        result.write_json(args.result_json)
        print(f"results: {args.result_json}")
    return 1 if args.fail_on_error and result.summary["failed"] else 0


def serve_config(args: argparse.Namespace):
    """The BenchConfig that `bench serve` options describe."""
    from .report import parse_goodput
    from .runner import BenchConfig
    from .workload import LengthDist, WorkloadConfig, adapter_names, load_dataset

    adapters = list(args.adapters) + adapter_names(
        args.adapter_prefix, args.num_adapters
    )
    cold = list(args.cold_adapters) + adapter_names(
        args.adapter_prefix, args.num_cold_adapters, start=args.num_adapters
    )
    workload = WorkloadConfig(
        endpoint=args.endpoint,
        base_model=args.model,
        adapters=tuple(adapters),
        cold_adapters=tuple(cold),
        popularity=args.popularity,
        cold_share=args.cold_share,
        base_share=args.base_share,
        num_tenants=len(args.api_key),
        tenant_weights=tuple(args.tenant_weights),
        prompt_len=LengthDist.parse(args.prompt_len),
        output_len=LengthDist.parse(args.output_len),
        vocab_size=args.vocab_size,
        dataset=tuple(load_dataset(args.dataset)) if args.dataset else (),
        request_rate=args.request_rate,
        arrival=args.arrival,
        seed=args.seed,
    )
    num = args.num_requests
    if num is None and args.duration is None:
        num = 100
    return BenchConfig(
        base_url=args.base_url,
        api_keys=tuple(args.api_key),
        workload=workload,
        num_requests=num,
        duration_s=args.duration,
        max_concurrency=args.max_concurrency,
        goodput=parse_goodput(args.goodput),
        ignore_eos=not args.no_ignore_eos,
        temperature=args.temperature,
        timeout_s=args.timeout,
        progress=not args.no_progress,
        save_itl=args.save_itl,
        label=args.label,
    )


def _run_adapters(args: argparse.Namespace) -> int:
    import asyncio

    from .adapters import BaseShapes, random_adapter, upload_adapters

    if args.count < 1 or args.rank < 1 or args.concurrency < 1:
        raise ValueError("--count, --rank and --concurrency must be >= 1")
    shapes = BaseShapes.from_model_dir(args.model)
    # Fail on a bad target or dtype before any upload.
    random_adapter(
        BaseShapes(1, 1, 1, 1, 1), 1, 0, tuple(args.targets), args.dtype, args.alpha
    )
    report = asyncio.run(
        upload_adapters(
            args.base_url,
            list(args.api_key),
            shapes,
            args.count,
            args.rank,
            prefix=args.prefix,
            start=args.start,
            distinct=args.distinct,
            concurrency=args.concurrency,
            replace=args.replace,
            dtype=args.dtype,
            targets=tuple(args.targets),
            seed=args.seed,
            alpha=args.alpha,
            timeout_s=args.timeout,
        )
    )
    print(report)
    for message in report.messages:
        print(f"  {message}", file=sys.stderr)
    return 1 if report.failed else 0
