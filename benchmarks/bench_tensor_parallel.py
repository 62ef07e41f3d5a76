"""bench_tensor_parallel: one engine split over N GPUs, against one GPU and the per-GPU floor.

    PYTHONPATH=src python benchmarks/bench_tensor_parallel.py run --shapes 8b --tp 2 --out DIR
    PYTHONPATH=src python benchmarks/bench_tensor_parallel.py report --out DIR

`run` starts one engine of `--tp` ranks (each size in a process of its own, so that every size
starts on empty GPUs), then:
- parity (`--parity-dir`): 8 prompts of 64 tokens over 4 adapters and the base, the first step's
  logits and 32 greedy tokens each, kept for `report` to compare with the other sizes;
- decode: B requests over D adapters (rank 16, all seven linears), prompts of 512 tokens, the
  median step where all B decode, against the per-GPU byte floor: the bytes rank 0 reads in a
  step (its shard of the weights, its shard of each distinct adapter, its KV heads of every
  sequence) over the copy bandwidth of GPU 0 measured in the same process.
`report` merges the sizes' JSON into tensor_parallel.json and prints the table. Dummy weights are
drawn as one checkpoint and cut per rank, so every size computes the same model. `--smoke` runs
the same path on the CPU over gloo with tiny shapes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_engine import run_batch
from engine_workload import (
    LLAMA_8B,
    RANK,
    SMOKE,
    adapter_read_bytes,
    ceilings,
    kv_bytes_per_token,
    random_adapter,
    weight_read_bytes,
    write_model_dir,
)
from loraplex.platform import Engine, EngineConfig, SamplingParams
from loraplex.platform.parallel import TensorParallel, shard_spec
from provenance import git_commit

LLAMA_70B = {
    **LLAMA_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
SHAPES = {"8b": LLAMA_8B, "70b": LLAMA_70B, "smoke": SMOKE}
PARITY_SLOTS = [0, 1, 2, 3, None, None, 0, 1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "report"])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--quantization", default="none", choices=["fp8", "none"])
    parser.add_argument("--parity-dir", type=Path, help="where logits and tokens go")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--distinct", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--skip-decode", action="store_true", help="parity only")
    return parser.parse_args()


def make_engine(model_dir: Path, args, device: str) -> Engine:
    return Engine(
        EngineConfig(
            model=str(model_dir),
            dtype=args.dtype if device == "cuda" else "float32",
            device=device,
            load_format="dummy",
            quantization=args.quantization,
            max_num_seqs=args.batch,
            max_num_batched_tokens=2048,
            max_model_len=max(args.prompt_len + args.new_tokens, 96) + 64,
            max_loras=max(args.distinct, len(set(PARITY_SLOTS))),
            max_lora_rank=RANK,
            enforce_eager=args.enforce_eager,
            gpu_memory_utilization=0.88,
            tensor_parallel_size=args.tp,
            num_kv_blocks=0 if device == "cuda" else 512,
        )
    )


def parity(engine: Engine, out: Path) -> dict:
    """First-step logits and 32 greedy tokens of 8 fixed prompts, saved for `report`."""
    gen = torch.Generator().manual_seed(17)
    prompts = [
        torch.randint(3, engine.spec.vocab_size, (64,), generator=gen).tolist()
        for _ in PARITY_SLOTS
    ]
    first: list[torch.Tensor] = []
    forward = engine.runner.forward

    def spy(batch):  # the logits of the first step (every prompt's prefill) only
        logits = forward(batch)
        if not first:
            first.append(logits.float().cpu())
        return logits

    engine.runner.forward = spy
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    for i, (prompt, slot) in enumerate(zip(prompts, PARITY_SLOTS, strict=True)):
        engine.add_request(f"parity-{i}", prompt, params, slot)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests:
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
    engine.runner.forward = forward
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"logits": first[0], "tokens": tokens},
        out / f"tp{engine.config.tensor_parallel_size}.pt",
    )
    return {"prompts": len(prompts), "new_tokens": 32}


def decode_floor(
    engine: Engine, batch: int, distinct: int, args, copy_gbps: float
) -> dict:
    """Bytes rank 0 reads in one decode step, over GPU 0's copy bandwidth."""
    spec = engine.spec
    local = shard_spec(spec, TensorParallel(0, engine.config.tensor_parallel_size))
    context = args.prompt_len + args.new_tokens / 2
    parts = {
        "weights": weight_read_bytes(engine.model, spec),
        "adapters": distinct * adapter_read_bytes(local, RANK),
        "kv": batch * context * kv_bytes_per_token(local, engine.kv_cache.tensor.dtype),
    }
    return {
        "bytes_per_gpu": parts,
        "floor_ms": 1e3 * sum(parts.values()) / (copy_gbps * 1e9),
    }


def run(args) -> None:
    device = "cpu" if args.shapes == "smoke" else "cuda"
    if device == "cpu":
        args.batch, args.distinct, args.prompt_len, args.new_tokens = 4, 2, 16, 6
    shapes = SHAPES[args.shapes]
    result = {
        "benchmark": "bench_tensor_parallel",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "num_gpus_visible": torch.cuda.device_count() if device == "cuda" else 0,
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "shapes": shapes,
        "ceilings_gpu0": ceilings(torch.device(device), device == "cpu"),
    }
    copy_gbps = result["ceilings_gpu0"]["copy_GBps"]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", shapes)
        start = time.perf_counter()
        engine = make_engine(model_dir, args, device)
        try:
            result["engine_start_s"] = time.perf_counter() - start
            result["num_kv_blocks"] = engine.kv_cache.num_blocks
            print(
                f"tp={args.tp} engine up in {result['engine_start_s']:.1f} s",
                flush=True,
            )
            adapter = random_adapter(engine.spec, RANK, seed=1)
            for slot in range(engine.config.max_loras):
                engine.load_adapter(
                    slot, adapter if slot else random_adapter(engine.spec, RANK, 2)
                )
            if args.parity_dir:
                result["parity"] = parity(engine, args.parity_dir)
            runs = []
            for batch, distinct in (
                (args.batch, args.distinct),
                (args.batch, 0),
                (1, 0),
            ):
                one = run_batch(
                    engine,
                    batch,
                    distinct,
                    args.prompt_len,
                    args.new_tokens,
                    f"d{batch}-{distinct}",
                )
                one.pop("decode_step_ms")
                one.update(decode_floor(engine, batch, distinct, args, copy_gbps))
                if one["median_decode_step_ms"]:
                    one["time_over_floor"] = (
                        one["median_decode_step_ms"] / one["floor_ms"]
                    )
                runs.append(one)
                print(_row(args.tp, one), flush=True)
            result["decode"] = runs
            graphs = engine.runner.decode_graphs
            result["graph_replays"] = graphs.num_replays if graphs else 0
        finally:
            engine.close()
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"tp-{args.shapes}-{args.quantization}-{args.dtype}-tp{args.tp}.json"
    (args.out / name).write_text(json.dumps(result, indent=1))


def report(args) -> None:
    """Merge every size's JSON, compare parity against size 1, and print the table."""
    sizes = [json.loads(p.read_text()) for p in sorted(args.out.glob("tp-*.json"))]
    merged = {"benchmark": "bench_tensor_parallel", "runs": sizes}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.parity_dir and (args.parity_dir / "tp1.pt").exists():
        merged["parity"] = compare_parity(args.parity_dir)
    (args.out / "tensor_parallel.json").write_text(json.dumps(merged, indent=1))
    print("| shapes | quant | TP | B | D | step ms | per-GPU floor ms | x floor |")
    print("|---|---|---|---|---|---|---|---|")
    for size in sizes:
        a = size["args"]
        for one in size.get("decode", []):
            step = one["median_decode_step_ms"]
            print(
                f"| {a['shapes']} | {a['quantization']} | {a['tp']} | {one['batch']} | "
                f"{one['distinct_adapters']} | {step:.2f} | {one['floor_ms']:.2f} | "
                f"{one.get('time_over_floor', float('nan')):.2f} |"
            )
    for size, stats in merged.get("parity", {}).items():
        print(f"parity {size} vs tp1: {stats}")


def compare_parity(folder: Path) -> dict:
    base = torch.load(folder / "tp1.pt")
    out = {}
    for path in sorted(folder.glob("tp*.pt")):
        if path.name == "tp1.pt":
            continue
        other = torch.load(path)
        a, b = other["logits"], base["logits"]
        same = [other["tokens"][k] == base["tokens"][k] for k in base["tokens"]]
        prefix = [
            next(
                (i for i, (x, y) in enumerate(zip(other["tokens"][k], t)) if x != y),
                len(t),
            )
            for k, t in base["tokens"].items()
        ]
        out[path.stem] = {
            "logits_rel_err": float((a - b).norm() / b.norm()),
            "logits_max_abs_diff": float((a - b).abs().max()),
            "logits_max_abs": float(b.abs().max()),
            "top1_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "sequences_identical": f"{sum(same)}/{len(same)}",
            "mean_identical_prefix": statistics.mean(prefix),
        }
    return out


def _row(tp: int, one: dict) -> str:
    step = one["median_decode_step_ms"]
    return (
        f"tp={tp} B={one['batch']} D={one['distinct_adapters']}: step "
        f"{step if step is None else round(step, 3)} ms, floor {one['floor_ms']:.3f} ms"
    )


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.action == "run":
        run(arguments)
    else:
        report(arguments)
