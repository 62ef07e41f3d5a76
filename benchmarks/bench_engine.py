"""bench_engine: decode steps against their byte floor, the LoRA tax, prefill, and the peer.

    PYTHONPATH=src python benchmarks/bench_engine.py --out DIR [--quantization fp8] [--smoke]

The standard workload of BENCHMARKS.md: Llama-3.1-8B shapes with dummy weights, adapters of rank
16 on all seven linears, prompts of 512 tokens and 128 generated tokens (EOS ignored) at batch B
with D distinct adapters. A decode step's floor is the bytes it must read (every base weight, each
distinct adapter's A and B, every sequence's KV cache) over the copy bandwidth measured in the
same run. transformers + PEFT runs the same mixed batch on the same card first. `--smoke` runs
tiny shapes on the CPU to check the plumbing only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine_workload import (
    LLAMA_8B,
    RANK,
    SMOKE,
    adapter_read_bytes,
    ceilings,
    kv_bytes_per_token,
    peer_generation,
    random_adapter,
    weight_read_bytes,
    write_model_dir,
)
from loraplex.platform import Engine, EngineConfig, SamplingParams
from provenance import git_commit as provenance_commit


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON")
    parser.add_argument("--quantization", default="fp8", choices=["fp8", "none"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-len", type=int, default=8192)
    parser.add_argument("--peer-new-tokens", type=int, default=16)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument(
        "--mixed-graph-max-tokens",
        type=int,
        default=None,
        help="the engine option (default: the engine's, 4096 on one GPU); with graphs, the "
        "mixed step is timed replayed as well as eager",
    )
    return parser.parse_args()


def make_engine(model_dir: Path, args, device: str, max_batch: int) -> Engine:
    options = {
        "model": str(model_dir),
        "dtype": "bfloat16" if device == "cuda" else "float32",
        "device": device,
        "load_format": "dummy",
        "max_num_seqs": max_batch,
        "max_num_batched_tokens": args.prefill_len,
        "max_model_len": args.prefill_len + 64,
        "max_loras": max_batch,
        "max_lora_rank": RANK,
        "enforce_eager": args.enforce_eager,
        "gpu_memory_utilization": 0.88,
        "mixed_graph_max_tokens": args.mixed_graph_max_tokens,
    }
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    if "quantization" in fields:
        options["quantization"] = args.quantization
    elif args.quantization != "none":
        print("this engine has no quantization option yet: running bf16", flush=True)
    if device == "cpu":
        options["num_kv_blocks"] = 4 * max_batch * (args.prefill_len // 16 + 8)
    return Engine(EngineConfig(**options))


def run_batch(engine, batch, distinct, prompt_len, new_tokens, tag) -> dict:
    """B requests over D adapters to completion; times every step where all B decode."""
    gen = torch.Generator().manual_seed(batch * 1000 + distinct)
    vocab = engine.spec.vocab_size
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=gen).tolist()
        slot = None if distinct == 0 else i % distinct
        engine.add_request(f"{tag}-{i}", prompt, params, slot)
    decode_steps, first_token_at = [], None
    start = time.perf_counter()
    while engine.has_unfinished_requests:
        sched = engine.scheduler
        decoding = (
            len(sched.running) == batch
            and not sched.waiting
            and all(r.num_computed_tokens == r.num_tokens - 1 for r in sched.running)
        )
        t0 = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - t0
        if decoding:
            decode_steps.append(elapsed)
        if first_token_at is None and any(o.new_token_ids for o in outputs):
            first_token_at = time.perf_counter() - start
    total = time.perf_counter() - start
    return {
        "batch": batch,
        "distinct_adapters": distinct,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "decode_step_ms": [1e3 * s for s in decode_steps],
        "median_decode_step_ms": 1e3 * statistics.median(decode_steps)
        if decode_steps
        else None,
        "first_token_s": first_token_at,
        "total_s": total,
        "tokens_per_s": batch * new_tokens / total,
    }


def decode_floor_ms(engine, batch, distinct, prompt_len, new_tokens, copy_gbps) -> dict:
    spec = engine.spec
    context = prompt_len + new_tokens / 2  # the mean context over the decode steps
    parts = {
        "weights": weight_read_bytes(engine.model, spec),
        "adapters": distinct * adapter_read_bytes(spec, RANK),
        "kv": batch * context * kv_bytes_per_token(spec, engine.kv_cache.tensor.dtype),
    }
    total = sum(parts.values())
    return {"bytes": parts, "floor_ms": 1e3 * total / (copy_gbps * 1e9)}


def mixed_run(
    engine, batch: int, distinct: int, prompt_len: int, chunk: int, reps: int = 5
) -> dict:
    """What serving runs most: B-1 requests (prompts of `prompt_len`) decoding while one new
    prompt of `chunk` tokens arrives, so one step carries the chunk and B-1 decodes (eager: no
    graph holds a prompt chunk). Per such step: its wall time, and the host time of the forward alone (launches
    enqueued, the GPU not waited for); the decode-only steps around them for comparison. A
    forward whose host time is near the step's wall time is launch-bound."""
    spec = engine.spec
    gen = torch.Generator().manual_seed(11)
    params = SamplingParams(max_tokens=4 * reps + 8, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i in range(batch - 1):
        prompt = torch.randint(3, spec.vocab_size, (prompt_len,), generator=gen)
        engine.add_request(
            f"mixed-{i}", prompt.tolist(), params, i % distinct if distinct else None
        )
    forward = engine.runner.forward
    host: list[float] = []

    def timed_forward(b):
        t0 = time.perf_counter()
        out = forward(b)
        host.append(time.perf_counter() - t0)
        return out

    engine.runner.forward = timed_forward
    mixed, decode = [], []
    try:
        for _ in range(3):  # every request past its prompt
            engine.step()
        for rep in range(reps):
            for kind, add in (("decode", False), ("mixed", True)):
                if add:
                    prompt = torch.randint(3, spec.vocab_size, (chunk,), generator=gen)
                    engine.add_request(f"chunk-{rep}", prompt.tolist(), short, None)
                t0 = time.perf_counter()
                engine.step()
                wall = time.perf_counter() - t0
                (mixed if add else decode).append((wall, host[-1]))
        while engine.has_unfinished_requests:
            engine.step()
    finally:
        engine.runner.forward = forward

    def medians(pairs):
        return {
            "wall_ms": 1e3 * statistics.median(w for w, _ in pairs),
            "forward_host_ms": 1e3 * statistics.median(h for _, h in pairs),
        }

    return {
        "batch": batch,
        "distinct_adapters": distinct,
        "chunk_tokens": chunk,
        "mixed_step": medians(mixed),
        "decode_step": medians(decode),
    }


def prefill_run(engine, length: int, fp8_tflops: float | None) -> dict:
    spec = engine.spec
    gen = torch.Generator().manual_seed(7)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for rep in range(3):
        prompt = torch.randint(3, spec.vocab_size, (length,), generator=gen).tolist()
        engine.add_request(f"prefill-{rep}", prompt, params, None)
        start = time.perf_counter()
        while engine.has_unfinished_requests:
            engine.step()
        times.append(time.perf_counter() - start)
    h, q, kv, inter = (
        spec.hidden_size,
        spec.q_size,
        spec.kv_size,
        spec.intermediate_size,
    )
    linear_params = h * (q + 2 * kv) + q * h + 2 * h * inter + inter * h
    attention = (
        2 * spec.num_heads * spec.head_dim * length * length
    )  # QKᵀ and PV, causal
    flops = spec.num_layers * (2 * length * linear_params + attention)
    seconds = statistics.median(times)
    out = {"tokens": length, "seconds": times, "TFLOPs": flops / seconds / 1e12}
    if fp8_tflops:
        out["fraction_of_fp8_matmul"] = out["TFLOPs"] / fp8_tflops
    return out


def git_commit() -> str:
    return provenance_commit()


def main() -> None:
    args = parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    shapes = SMOKE if device == "cpu" else LLAMA_8B
    if device == "cpu":
        args.batches, args.prompt_len, args.new_tokens = "1,4", 16, 6
        args.prefill_len, args.skip_peer = 64, True
    batches = [int(b) for b in args.batches.split(",")]
    result = {
        "benchmark": "bench_engine",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "shapes": shapes,
    }
    result["ceilings"] = ceilings(torch.device(device), device == "cpu")
    copy_gbps = result["ceilings"]["copy_GBps"]
    print(f"ceilings: {result['ceilings']}", flush=True)
    if not args.skip_peer:
        try:
            result["peer"] = peer_generation(shapes, 32, 32, 128, args.peer_new_tokens)
        except Exception as exc:  # noqa: BLE001 - the peer's failure is a result to report
            result["peer"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"peer: {result['peer']}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", shapes)
        start = time.perf_counter()
        engine = make_engine(model_dir, args, device, max(batches))
        result["engine_start_s"] = time.perf_counter() - start
        plan = engine.runner.memory_plan
        result["memory_plan"] = dataclasses.asdict(plan) if plan else None
        result["num_kv_blocks"] = engine.kv_cache.num_blocks
        adapter = random_adapter(engine.spec, RANK, seed=1)
        for slot in range(max(batches)):
            engine.load_adapter(slot, adapter)
        print(f"engine up in {result['engine_start_s']:.1f} s", flush=True)
        runs = []
        for batch in batches:
            for distinct in sorted({0, 1, 8, batch} & set(range(batch + 1))):
                run = run_batch(
                    engine, batch, distinct, args.prompt_len, args.new_tokens, "d"
                )
                run.update(
                    decode_floor_ms(
                        engine,
                        batch,
                        distinct,
                        args.prompt_len,
                        args.new_tokens,
                        copy_gbps,
                    )
                )
                if run["median_decode_step_ms"]:
                    run["time_over_floor"] = (
                        run["median_decode_step_ms"] / run["floor_ms"]
                    )
                runs.append(run)
                print(_row(run), flush=True)
        result["decode"] = runs
        if not args.skip_peer:
            result["ours_like_peer"] = run_batch(
                engine, 32, 32, 128, args.peer_new_tokens, "peer-like"
            )
        mixed_batch = max(batches)
        if mixed_batch > 1:
            runner = engine.runner
            chunk = min(512, args.prefill_len)
            mixed = functools.partial(
                mixed_run, engine, mixed_batch, min(8, mixed_batch - 1)
            )
            graphs, runner.mixed_graphs = runner.mixed_graphs, None
            result["mixed"] = mixed(args.prompt_len, chunk)  # eager, as by default
            runner.mixed_graphs = graphs
            if graphs is not None:
                result["mixed_graph"] = mixed(args.prompt_len, chunk)
            print(
                f"mixed {result['mixed']} {result.get('mixed_graph', '')}", flush=True
            )
        result["prefill"] = prefill_run(
            engine, args.prefill_len, result["ceilings"].get("fp8_TFLOPs")
        )
        result["graph_replays"] = (
            engine.runner.decode_graphs.num_replays
            if engine.runner.decode_graphs
            else 0
        )
    result["summary"] = summarize(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_engine.json").write_text(json.dumps(result, indent=1))
    print(table(result))


def summarize(result: dict) -> dict:
    runs = {(r["batch"], r["distinct_adapters"]): r for r in result["decode"]}
    out = {}

    def tax(batch, distinct):
        run, base = runs.get((batch, distinct)), runs.get((batch, 0))
        if not run or not base or not run["median_decode_step_ms"]:
            return None
        time_ratio = run["median_decode_step_ms"] / base["median_decode_step_ms"]
        return time_ratio / (run["floor_ms"] / base["floor_ms"])

    out["b64_d8_time_over_floor"] = runs.get((64, 8), {}).get("time_over_floor")
    out["excess_lora_tax_b64_d8"] = tax(64, 8)
    out["excess_lora_tax_b64_d64"] = tax(64, 64)
    single = runs.get((1, 0))
    if single and single.get("time_over_floor"):
        out["single_stream_fraction_of_floor"] = 1 / single["time_over_floor"]
    peer, ours = result.get("peer", {}), result.get("ours_like_peer")
    if ours and peer.get("tokens_per_s"):
        out["speedup_over_peer_b32_d32"] = ours["tokens_per_s"] / peer["tokens_per_s"]
    out["prefill_fraction_of_fp8_matmul"] = result["prefill"].get(
        "fraction_of_fp8_matmul"
    )
    return out


def _row(run: dict) -> str:
    step = run["median_decode_step_ms"]
    ratio = run.get("time_over_floor")
    return (
        f"B={run['batch']:4d} D={run['distinct_adapters']:4d}  step "
        f"{step if step is None else f'{step:8.3f}'} ms  floor {run['floor_ms']:8.3f} ms  "
        f"x{ratio if ratio is None else f'{ratio:.2f}'}  {run['tokens_per_s']:9.1f} tok/s"
    )


def table(result: dict) -> str:
    lines = [
        f"bench_engine on {result['device']} ({result['date']}, {result['commit'][:8]})"
    ]
    lines += [_row(run) for run in result["decode"]]
    for key in ("mixed", "mixed_graph"):
        if key not in result:
            continue
        m = result[key]
        how = "eager" if key == "mixed" else "graph"
        lines.append(
            f"B={m['batch']} with a {m['chunk_tokens']}-token chunk ({how}): step"
            f" {m['mixed_step']['wall_ms']:.2f} ms (forward host"
            f" {m['mixed_step']['forward_host_ms']:.2f} ms); decode-only step"
            f" {m['decode_step']['wall_ms']:.2f} ms (host"
            f" {m['decode_step']['forward_host_ms']:.2f} ms)"
        )
    lines.append(f"prefill {result['prefill']}")
    for key, value in result["summary"].items():
        lines.append(f"{key:36s} {value}")
    return "\n".join(lines)


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
