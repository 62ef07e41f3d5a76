"""profile_host_step: the host (CPU) time of each phase of a decode step, the forward made free.

    PYTHONPATH=src python benchmarks/profile_host_step.py [--out benchmarks/results] [--rounds 3]

On a GPU the decode step's device work waits for the host to schedule, fill the graph's input
buffers, prepare sampling, copy the tokens back, update the scheduler and detokenize. This
harness measures that host work alone, on any CPU: a tiny random Llama (the SMOKE shapes of
engine_workload, config.json only, dummy weights, float32 on the CPU) whose forward returns
zeros, and decode graphs whose replay is a no-op over static logits, so that `Engine.step` runs
exactly the host code of a graph step on a GPU (schedule, `DecodeGraphs._fill`, sampler,
scheduler update, detokenizer) and nothing else. The sampler's torch ops run on the CPU here
(tiny: vocab 256), where a GPU would launch them.

For each batch size B (decode-only, prompts of 512 tokens, greedy, EOS ignored) and number of
distinct adapters D, it brings B requests to steady decode, then records `--steps` steps per
round, each phase timed by wrapping the method the step calls. Beside the step it times, on the
same batches: the eager path's `prepare_inputs` (what the same batch costs with enforce_eager,
or as the decodes of a mixed step), and what tensor parallelism adds: rank 0's packing of the
step (`tp_wire`), and on a worker rank its unpacking then `bucket_for` + `_fill` of its own
graphs. Each number is the median over a round's steps; the table shows the median over rounds.
Writes OUT/host-step-cpu-<date>[-TAG].json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from engine_workload import RANK, SMOKE, random_adapter, write_model_dir
from loraplex.platform import Engine, EngineConfig, PrefixScope, SamplingParams
from loraplex.platform.cuda_graphs import DecodeGraphs, default_buckets
from loraplex.platform.inputs import prepare_inputs
from loraplex.platform.tp_wire import pack_batch, unpack_batch
from provenance import git_commit

try:  # the stateful wire (block tables sent as they change) that the engine uses
    from loraplex.platform.tp_wire import BatchReceiver, BatchSender
except ImportError:  # before it: every step sent whole
    BatchSender = BatchReceiver = None

# (phase, object attribute of the engine, method): what Engine.step calls, in order.
# bucket_for and _fill run inside runner.forward; "replay" is forward minus those two.
WRAPPED = (
    ("schedule", "scheduler", "schedule"),
    ("forward", "runner", "forward"),
    ("bucket_for", "graphs", "bucket_for"),
    ("fill", "graphs", "_fill"),
    ("prepare", "sampler", "prepare"),
    ("sample", "sampler", "sample"),
    ("to_host", "sampler", "to_host"),
    ("update", "scheduler", "update"),
    ("outputs", "outputs", "process"),
)
STEP_PHASES = (
    "schedule",
    "bucket_for",
    "fill",
    "replay",
    "prepare",
    "sample",
    "to_host",
    "update",
    "outputs",
    "other",
    "step",
)
SIDE_PHASES = ("prepare_inputs", "tp_pack", "tp_unpack", "tp_worker_fill")


class _FreeGraph:
    """A captured graph's stand-in: replaying it costs nothing."""

    def replay(self) -> None:
        pass


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer of exactly 256 ids (the SMOKE vocabulary), built offline."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def make_engine(model_dir: Path, max_num_seqs: int, args) -> Engine:
    max_model_len = args.prompt_len + args.max_tokens + 16
    blocks_per_seq = -(-max_model_len // 16)
    config = EngineConfig(
        model=str(model_dir),
        dtype="float32",
        device="cpu",
        load_format="dummy",
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=8192,
        max_model_len=max_model_len,
        max_loras=max_num_seqs,
        max_lora_rank=RANK,
        num_kv_blocks=max_num_seqs * blocks_per_seq,
    )
    engine = Engine(config, byte_tokenizer() if args.tokenizer else None)
    make_forward_free(engine)
    engine.runner.decode_graphs = free_graphs(engine)
    adapter = random_adapter(engine.spec, RANK, seed=1)
    for slot in range(config.max_loras):
        engine.load_adapter(slot, adapter)
    return engine


def make_forward_free(engine: Engine) -> None:
    """The eager forward returns zero logits of the right shape (prefills cost no compute)."""
    vocab = engine.spec.vocab_size

    def forward(inputs, kv_cache):
        return torch.zeros(inputs.logits_indices.shape[0], vocab)

    engine.model.forward = forward


def free_graphs(engine: Engine) -> DecodeGraphs:
    """Decode graphs as on a GPU (static buffers, `_fill`, replay), with no-op replays."""
    runner, config = engine.runner, engine.config
    graphs = DecodeGraphs(
        engine.model,
        engine.kv_cache,
        buckets=default_buckets(config.max_num_seqs),
        max_blocks_per_seq=runner.max_blocks_per_seq,
        max_model_len=engine.max_model_len,
        max_loras=config.max_loras,
        device=engine.device,
        capture=False,
    )
    for bucket in graphs.buckets:
        for use_lora in (False, True):
            logits = torch.zeros(bucket, engine.spec.vocab_size)
            graphs._graphs[(bucket, use_lora)] = (_FreeGraph(), logits)
    graphs.capture = True  # run() replays the stand-ins, as it replays graphs on a GPU
    return graphs


def start_decoding(engine: Engine, batch: int, distinct: int, args, tag: str) -> None:
    """B requests, request i on adapter i % D (base when D = 0), prefilled, decoding."""
    gen = torch.Generator().manual_seed(batch * 1000 + distinct)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True
    )
    vocab = engine.spec.vocab_size
    for i in range(batch):
        prompt = torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist()
        slot = i % distinct if distinct else None
        scope = PrefixScope(None if slot is None else f"digest-{slot}", salt="tenant")
        engine.add_request(f"{tag}-{i}", prompt, params, slot, scope)
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running
    ):
        engine.step()
    for _ in range(args.warmup):
        engine.step()


def instrument(engine: Engine, record: dict, batches: list) -> None:
    """Wrap each method of WRAPPED on its instance: its time per step goes into `record`."""
    owners = {
        "scheduler": engine.scheduler,
        "runner": engine.runner,
        "graphs": engine.runner.decode_graphs,
        "sampler": engine.sampler,
        "outputs": engine.outputs,
    }
    for phase, owner, method in WRAPPED:
        target = owners[owner]
        inner = getattr(target, method)
        setattr(target, method, _timed(record, phase, inner))
    schedule = engine.scheduler.schedule

    def keep_batches():
        batch = schedule()
        batches.append(batch)
        return batch

    engine.scheduler.schedule = keep_batches


def uninstrument(engine: Engine) -> None:
    for _, owner, method in WRAPPED:
        target = {
            "scheduler": engine.scheduler,
            "runner": engine.runner,
            "graphs": engine.runner.decode_graphs,
            "sampler": engine.sampler,
            "outputs": engine.outputs,
        }[owner]
        if method in vars(target):
            delattr(target, method)


def _timed(record: dict, phase: str, inner):
    clock = time.perf_counter_ns

    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return inner(*args, **kwargs)
        finally:
            record[phase] += clock() - start

    return wrapper


def measure_round(engine: Engine, steps: int) -> dict[str, float]:
    """Median µs per phase over `steps` decode steps, and the side phases on their batches."""
    record: dict[str, int] = defaultdict(int)
    batches: list = []
    instrument(engine, record, batches)
    samples: dict[str, list[float]] = defaultdict(list)
    clock = time.perf_counter_ns
    try:
        for _ in range(steps):
            record.clear()
            start = clock()
            engine.step()
            total = clock() - start
            step = {k: v / 1e3 for k, v in record.items()}
            step["replay"] = step["forward"] - step["bucket_for"] - step["fill"]
            step["step"] = total / 1e3
            named = ("schedule", "forward", "prepare", "sample", "to_host", "update")
            step["other"] = step["step"] - sum(step[k] for k in (*named, "outputs"))
            for phase in STEP_PHASES:
                samples[phase].append(step[phase])
    finally:
        uninstrument(engine)
    assert engine.runner.decode_graphs.num_replays, "the steps did not replay graphs"
    for phase, values in side_phases(engine, batches).items():
        samples[phase] = values
    return {phase: statistics.median(values) for phase, values in samples.items()}


def side_phases(engine: Engine, batches: list) -> dict[str, list[float]]:
    """The eager path's prepare_inputs, and TP's pack, unpack and worker fill, per batch."""
    worker = free_graphs(engine)  # a worker rank's own buffers
    lora = engine.runner.lora_enabled
    if BatchSender is not None:
        pack, unpack = BatchSender().pack, BatchReceiver().unpack
    else:
        pack, unpack = pack_batch, unpack_batch
    clock, out = time.perf_counter_ns, defaultdict(list)
    for batch in batches:
        start = clock()
        prepare_inputs(batch, engine.config.block_size, engine.device, lora)
        out["prepare_inputs"].append((clock() - start) / 1e3)
        start = clock()
        packed = pack(batch)
        out["tp_pack"].append((clock() - start) / 1e3)
        start = clock()
        received = unpack(packed.clone())
        out["tp_unpack"].append((clock() - start) / 1e3)
        start = clock()
        worker._fill(received, worker.bucket_for(received))
        out["tp_worker_fill"].append((clock() - start) / 1e3)
    return out


def run_case(model_dir: Path, batch: int, distinct: int, max_num_seqs: int, args):
    engine = make_engine(model_dir, max_num_seqs, args)
    start_decoding(engine, batch, distinct, args, f"b{batch}d{distinct}")
    rounds = [measure_round(engine, args.steps) for _ in range(args.rounds)]
    engine.close()
    phases = (*STEP_PHASES, *SIDE_PHASES)
    median = {p: statistics.median(r[p] for r in rounds) for p in phases}
    return {
        "batch": batch,
        "distinct_adapters": distinct,
        "max_num_seqs": max_num_seqs,
        "us_median": median,
        "us_rounds": rounds,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(results: list[dict]) -> None:
    phases = (*STEP_PHASES, *SIDE_PHASES)
    short = {
        "bucket_for": "bucket",
        "prepare_inputs": "prep_in",
        "tp_pack": "pack",
        "tp_unpack": "unpack",
        "tp_worker_fill": "wfill",
    }
    head = "  B    D " + "".join(f"{short.get(p, p):>9}" for p in phases)
    print("\nµs per decode step, host only (median over rounds of per-step medians)")
    print(head)
    for r in results:
        cells = "".join(f"{r['us_median'][p]:9.1f}" for p in phases)
        print(f"{r['batch']:>3} {r['distinct_adapters']:>4} {cells}")


def cases(args) -> list[tuple[int, int, int]]:
    out = []
    for batch in (int(b) for b in args.batches.split(",")):
        max_num_seqs = max(64, batch)
        for distinct in sorted({0, min(8, batch), batch}):
            out.append((batch, distinct, max_num_seqs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--no-tokenizer", dest="tokenizer", action="store_false")
    parser.add_argument("--tag", default="", help="appended to the JSON's file name")
    args = parser.parse_args()
    args.max_tokens = args.warmup + args.rounds * args.steps + 8
    torch.set_num_threads(1)  # host work is single-threaded; tiny ops gain nothing
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", SMOKE)
        for batch, distinct, max_num_seqs in cases(args):
            results.append(run_case(model_dir, batch, distinct, max_num_seqs, args))
            print(
                f"B={batch} D={distinct}: step "
                f"{results[-1]['us_median']['step']:.0f} µs",
                flush=True,
            )
    print_table(results)
    date = datetime.date.today().isoformat()
    report = {
        "benchmark": "profile_host_step",
        "device": f"CPU only, no GPU: {cpu_name()}, {os.cpu_count()} cores",
        "date": date,
        "commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
        },
        "note": "host time only: the forward is free and graph replay a no-op; µs per step",
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.tag}" if args.tag else ""
    path = args.out / f"host-step-cpu-{date}{suffix}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
