"""bench_prefix_cache: time to first token and throughput with the prefix cache on and off.

    PYTHONPATH=src python benchmarks/bench_prefix_cache.py --out DIR [--smoke]

The workload of issue 9: Llama-3.1-8B shapes with dummy weights in bf16, 8 random rank-16
adapters on all seven linears, 64 requests spread over the 8 adapters (request i uses adapter
i % 8), each a 2,048-token system prompt shared by all followed by a distinct 64-token question,
32 generated tokens (EOS ignored), all arriving at once, through the Engine directly.

One engine runs a warm-up burst (uncached), then four measured bursts in this order:

- off:      no request has a cache root, so nothing is hashed, looked up or indexed: the engine
            path of `--no-enable-prefix-caching` (the stats confirm zero queries);
- on-cold:  the cache starts empty; each adapter's system prompt is computed by its first request
            (blocks are keyed by adapter content: another adapter's KV is never reused);
- on-warm:  the same system prompt again (the steady state of a server whose system prompt has
            been seen): only the questions are computed;
- off-again: the on-warm burst's prompts uncached, to show the card did not drift.

The baseline is the better of the two uncached bursts. Outputs of cached and uncached bursts
with the same prompts are compared token by token (reported, not asserted: bf16 in other batch
shapes may break near-ties; the CPU tests hold exact identity in fp32).

TTFT of a request is from the burst's start to the end of the step that returned its first
token. The KV cache is sized explicitly (every request of the uncached burst resident at once,
plus the cached prompts), so that it fits an 80 GB card beside the weights. `--smoke` runs
small shapes on the CPU to check the plumbing only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine_workload import LLAMA_8B, SMOKE, random_adapter, write_model_dir
from loraplex.platform import Engine, EngineConfig, PrefixScope, SamplingParams
from provenance import git_commit as provenance_commit

RANK = 16
FULL = {"requests": 64, "adapters": 8, "system": 2048, "question": 64, "new_tokens": 32}
SMALL = {"requests": 16, "adapters": 4, "system": 64, "question": 8, "new_tokens": 4}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON")
    parser.add_argument("--smoke", action="store_true", help="small shapes on the CPU")
    return parser.parse_args()


def make_engine(model_dir: Path, device: str, work: dict) -> Engine:
    block_size = 16
    per_request = math.ceil(
        (work["system"] + work["question"] + work["new_tokens"]) / block_size
    )
    cached_prompts = work["adapters"] * math.ceil(work["system"] / block_size)
    options = {
        "model": str(model_dir),
        "dtype": "bfloat16" if device == "cuda" else "float32",
        "device": device,
        "load_format": "dummy",
        "block_size": block_size,
        "max_loras": work["adapters"],
        "max_lora_rank": RANK,
        "max_model_len": 4096,
        # The uncached burst holds every request at once; the cached prompts come on top.
        "num_kv_blocks": work["requests"] * per_request + cached_prompts + 256,
        "enable_prefix_caching": True,
    }
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    return Engine(EngineConfig(**{k: v for k, v in options.items() if k in known}))


def prompts(work: dict, vocab: int, seed: int) -> list[list[int]]:
    """The shared system prompt (seed 0) followed by distinct questions (this burst's seed)."""
    system_gen = torch.Generator().manual_seed(0)
    system = torch.randint(3, vocab, (work["system"],), generator=system_gen).tolist()
    gen = torch.Generator().manual_seed(1000 + seed)
    return [
        system + torch.randint(3, vocab, (work["question"],), generator=gen).tolist()
        for _ in range(work["requests"])
    ]


def burst(engine: Engine, work: dict, tag: str, seed: int, cached: bool) -> dict:
    """Every request at once, run to completion; per-request TTFT and the cache's counters."""
    params = SamplingParams(
        max_tokens=work["new_tokens"], temperature=0.0, ignore_eos=True
    )
    before = engine.stats()
    ids = [f"{tag}-{i}" for i in range(work["requests"])]
    first_token: dict[str, float] = {}
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    steps = 0
    start = time.perf_counter()
    for i, (rid, prompt) in enumerate(
        zip(ids, prompts(work, engine.spec.vocab_size, seed), strict=True)
    ):
        slot = i % work["adapters"]
        scope = PrefixScope(f"bench-adapter-{slot}", "bench") if cached else None
        engine.add_request(rid, prompt, params, slot, scope)
    while engine.has_unfinished_requests:
        outputs = engine.step()
        steps += 1
        now = time.perf_counter() - start
        for out in outputs:
            if out.new_token_ids and out.request_id not in first_token:
                first_token[out.request_id] = now
            tokens[out.request_id].extend(out.new_token_ids)
    total = time.perf_counter() - start
    after = engine.stats()
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    ttft = [first_token[rid] for rid in ids]
    generated = sum(len(t) for t in tokens.values())
    return {
        "burst": tag,
        "cache": cached,
        "seconds": total,
        "steps": steps,
        "ttft_s": ttft,
        "ttft_median_s": statistics.median(ttft),
        "ttft_p90_s": _quantile(ttft, 0.9),
        "output_tokens_per_s": generated / total,
        "requests_per_s": len(ids) / total,
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "hit_rate": hits / queries if queries else 0.0,
        "preemptions": after.num_preemptions - before.num_preemptions,
        "tokens": [tokens[rid] for rid in ids],
    }


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def git_commit() -> str:
    return provenance_commit()


def versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    out["cuda"] = torch.version.cuda
    return out


def main() -> int:
    args = parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    shapes, work = (LLAMA_8B, FULL) if device == "cuda" else (SMOKE, SMALL)
    result = {
        "benchmark": "bench_prefix_cache",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "versions": versions(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "shapes": shapes,
        "workload": {**work, "rank": RANK, "targets": "all seven linears"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", shapes)
        started = time.perf_counter()
        engine = make_engine(model_dir, device, work)
        for slot in range(work["adapters"]):
            engine.load_adapter(slot, random_adapter(engine.spec, RANK, seed=slot + 1))
        result["engine_start_s"] = time.perf_counter() - started
        result["engine_config"] = dataclasses.asdict(engine.config)
        result["num_kv_blocks"] = engine.stats().num_kv_blocks
        print(f"engine up in {result['engine_start_s']:.1f} s", flush=True)
        # Warm-up: a whole uncached burst, so that every kernel, graph and compiled shape
        # of the measured bursts has run once outside the measurements.
        burst(engine, work, "warmup", 99, False)
        runs = [
            burst(engine, work, "off", 1, False),
            burst(engine, work, "on-cold", 1, True),
            burst(engine, work, "on-warm", 2, True),
            burst(engine, work, "off-again", 2, False),
        ]
    for run in runs:
        print(_row(run), flush=True)
    result["runs"] = runs
    result["summary"] = summarize(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_prefix_cache.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


def summarize(runs: list[dict]) -> dict:
    by = {run["burst"]: run for run in runs}
    # The better of the two uncached bursts is the baseline (the conservative choice).
    off = min(by["off"]["ttft_median_s"], by["off-again"]["ttft_median_s"])
    off_tps = max(
        by["off"]["output_tokens_per_s"], by["off-again"]["output_tokens_per_s"]
    )

    def same(a: str, b: str) -> float:
        pairs = zip(by[a]["tokens"], by[b]["tokens"], strict=True)
        return statistics.mean(x == y for x, y in pairs)

    return {
        "ttft_median_speedup_warm": off / by["on-warm"]["ttft_median_s"],
        "ttft_median_speedup_cold": off / by["on-cold"]["ttft_median_s"],
        "throughput_ratio_warm": by["on-warm"]["output_tokens_per_s"] / off_tps,
        "throughput_ratio_cold": by["on-cold"]["output_tokens_per_s"] / off_tps,
        "hit_rate_warm": by["on-warm"]["hit_rate"],
        "hit_rate_cold": by["on-cold"]["hit_rate"],
        "same_tokens_cold_vs_off": same("on-cold", "off"),
        "same_tokens_warm_vs_off_again": same("on-warm", "off-again"),
        "off_queries": by["off"]["prefix_cache_queries"],
    }


def _row(run: dict) -> str:
    return (
        f"{run['burst']:10s} TTFT median {1e3 * run['ttft_median_s']:8.1f} ms  "
        f"p90 {1e3 * run['ttft_p90_s']:8.1f} ms  {run['output_tokens_per_s']:8.1f} tok/s  "
        f"hit rate {run['hit_rate']:.3f}  {run['steps']} steps  "
        f"{run['preemptions']} preemptions"
    )


def table(result: dict) -> str:
    work = result["workload"]
    lines = [
        (
            f"bench_prefix_cache on {result['device']} ({result['date']}, "
            f"{result['commit'][:8]}): {work['requests']} requests over "
            f"{work['adapters']} adapters, {work['system']}-token system prompt + "
            f"{work['question']}-token questions, {work['new_tokens']} new tokens"
        ),
    ]
    lines += [_row(run) for run in result["runs"]]
    for key, value in result["summary"].items():
        shown = f"{value:.3f}" if isinstance(value, float) else value
        lines.append(f"  {key:32s} {shown}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
