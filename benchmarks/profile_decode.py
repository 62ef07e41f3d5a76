"""profile_decode: where a decode step's time goes, kernel by kernel, on the standard workload.

    PYTHONPATH=src python benchmarks/profile_decode.py --out DIR [--batches 1,64] [--distinct 8]

Brings B requests (prompt 512) to steady decode, then records a few steps under torch.profiler
and prints the kernels by total device time, with the step's wall time and the sum of its
kernels' time (the gap is host work and launch latency). Writes DIR/profile_decode.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_engine import make_engine
from engine_workload import LLAMA_8B, RANK, random_adapter, write_model_dir
from loraplex.platform import SamplingParams


def steady_decode(engine, batch: int, distinct: int, tag: str) -> None:
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(
            3, engine.spec.vocab_size, (512,), generator=gen
        ).tolist()
        engine.add_request(
            f"{tag}-{i}", prompt, params, i % distinct if distinct else None
        )
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running
    ):
        engine.step()
    for _ in range(5):
        engine.step()


def profile_steps(engine, steps: int) -> dict:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    return kernel_summary(prof, wall, steps, top=40)


def kernel_summary(prof, wall_s: float, steps: int, top: int) -> dict:
    """A torch.profiler run of `steps` steps taking `wall_s` each: per step, the kernels by
    device time (the `top` largest), their total ms and launch count."""
    kernels = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0)
        if device_us and event.device_type.name == "CUDA":
            kernels.append(
                {
                    "name": event.key[:90],
                    "count": event.count // steps,
                    "us": device_us / steps,
                }
            )
    kernels.sort(key=lambda k: -k["us"])
    return {
        "wall_ms": 1e3 * wall_s,
        "kernel_ms": sum(k["us"] for k in kernels) / 1e3,
        "launches": sum(k["count"] for k in kernels),
        "kernels": kernels[:top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--distinct", type=int, default=8)
    parser.add_argument("--quantization", default="fp8")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    args.prefill_len, args.smoke = 4096, False
    batches = [int(b) for b in args.batches.split(",")]
    results = {"device": torch.cuda.get_device_name(), "args": vars(args) | {"out": ""}}
    model_dir = write_model_dir(Path("/tmp/profile-model"), LLAMA_8B)
    engine = make_engine(model_dir, args, "cuda", max(batches))
    adapter = random_adapter(engine.spec, RANK, seed=1)
    for slot in range(max(args.distinct, 1)):
        engine.load_adapter(slot, adapter)
    for batch in batches:
        for distinct in (0, min(args.distinct, batch)):
            steady_decode(engine, batch, distinct, f"p{batch}-{distinct}")
            run = profile_steps(engine, args.steps)
            results[f"B{batch}_D{distinct}"] = run
            for request_id in list(engine._requests):
                engine.abort(request_id)
            engine.step()
            print(
                f"\nB={batch} D={distinct}: step {run['wall_ms']:.2f} ms wall, "
                f"{run['kernel_ms']:.2f} ms in {run['launches']} kernels"
            )
            for k in run["kernels"][:18]:
                print(f"  {k['us']:9.1f} us  x{k['count']:4d}  {k['name']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_decode.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
