"""profile_mixed: where the host time of an eager step with a prompt chunk goes.

    PYTHONPATH=src:benchmarks python benchmarks/profile_mixed.py --out DIR [--batch 64] [--chunk 512]

On the standard workload (Llama-3.1-8B shapes, FP8, rank-16 adapters), B-1 requests decode from
CUDA graphs while one new prompt of `chunk` tokens arrives each rep, so each such step runs
eager. Those steps run under cProfile (host: functions by own time and by cumulative time) and
one more under torch.profiler (device: kernels by total time, and the launch count). Writes
DIR/profile_mixed.json and prints both tables.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_engine import make_engine
from engine_workload import LLAMA_8B, RANK, SMOKE, random_adapter, write_model_dir
from loraplex.platform import SamplingParams
from profile_decode import kernel_summary


def start_decoding(
    engine, batch: int, distinct: int, prompt_len: int, max_tokens: int
) -> None:
    gen = torch.Generator().manual_seed(5)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch - 1):
        prompt = torch.randint(3, engine.spec.vocab_size, (prompt_len,), generator=gen)
        engine.add_request(f"d-{i}", prompt.tolist(), params, i % distinct)
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running
    ):
        engine.step()
    for _ in range(3):
        engine.step()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def mixed_step(engine, rep: int, chunk: int) -> float:
    """One step carrying a new `chunk`-token prompt; returns its wall seconds."""
    prompt = torch.randint(3, engine.spec.vocab_size, (chunk,))
    once = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.add_request(f"chunk-{rep}", prompt.tolist(), once, None)
    sync()
    t0 = time.perf_counter()
    engine.step()
    sync()
    return time.perf_counter() - t0


def host_profile(engine, reps: int, chunk: int) -> tuple[list[float], str]:
    walls = [mixed_step(engine, -1, chunk)]  # first: compiles and caches, not profiled
    profiler = cProfile.Profile()
    for rep in range(reps):
        engine.step()  # a decode-only step between, as in serving
        profiler.enable()
        walls.append(mixed_step(engine, rep, chunk))
        profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    return walls, text.getvalue()


def device_profile(engine, chunk: int) -> dict:
    engine.step()
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        wall = mixed_step(engine, 10_000, chunk)
    return kernel_summary(prof, wall, steps=1, top=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--distinct", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--quantization", default="fp8")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args()
    args.prefill_len, args.enforce_eager, args.mixed_graph_max_tokens = 4096, False, 0
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.batch, args.distinct, args.chunk = 4, 2, 16
        args.prefill_len, args.quantization = 64, "none"
    shapes = SMOKE if args.smoke else LLAMA_8B
    model_dir = write_model_dir(Path("/tmp/profile-mixed-model"), shapes)
    engine = make_engine(model_dir, args, device, args.batch)
    adapter = random_adapter(engine.spec, RANK, seed=1)
    for slot in range(args.distinct):
        engine.load_adapter(slot, adapter)
    prompt_len = 16 if args.smoke else 512
    start_decoding(
        engine, args.batch, args.distinct, prompt_len, 40 if args.smoke else 400
    )
    walls, host_text = host_profile(engine, args.reps, args.chunk)
    profiled = device_profile(engine, args.chunk)
    print(host_text)
    print(
        f"mixed step walls (ms, first = uncached): {[round(1e3 * w, 2) for w in walls]}"
    )
    print(
        f"under torch.profiler: {profiled['wall_ms']:.1f} ms wall, "
        f"{profiled['kernel_ms']:.2f} ms in {profiled['launches']} kernels"
    )
    for k in profiled["kernels"][:20]:
        print(f"  {k['us']:9.1f} us  x{k['count']:4d}  {k['name']}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "args": {k: str(v) for k, v in vars(args).items()},
        "mixed_step_walls_ms": [1e3 * w for w in walls],
        "device_profile": profiled,
        "host_profile": host_text,
    }
    (args.out / "profile_mixed.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
