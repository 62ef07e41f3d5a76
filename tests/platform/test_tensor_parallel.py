"""Tensor parallelism over gloo on the CPU: two ranks (this process and one worker process) give,
in fp32, exactly the tokens of one rank for a mixed batch of adapters, which are those of
transformers + PEFT; a worker that dies stops the engine with a clear error, never a hang."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest
import torch
from engine_utils import greedy, run_to_completion
from test_lora_batch import (
    ADAPTERS,
    adapters_with_peft,
    expected_tokens,
    requests_over_adapters,
)

from checkpoints import save_random_adapter, save_tiny_model
from loraplex.adapters_registry import load_adapter_dir
from loraplex.kernels.sgmv import rank_major
from loraplex.platform import (
    Engine,
    EngineConfig,
    EngineThread,
    LoraModuleWeights,
    LoraWeights,
    ModelSpec,
    SamplingParams,
)
from loraplex.platform.errors import ModelLoadError
from loraplex.platform.lora_slots import shard_lora_weights
from loraplex.platform.parallel import (
    TensorParallel,
    check_shardable,
    shard_spec,
)
from loraplex.platform.tp_wire import (
    BatchReceiver,
    BatchSender,
    pack_adapter,
    pack_batch,
    unpack_adapter,
    unpack_batch,
)
from loraplex.platform.tp_workers import TensorParallelError


def make_engine(model_dir, world_size, **options):
    config = {
        "dtype": "float32",
        "device": "cpu",
        "max_loras": 3,
        "max_lora_rank": 16,
        "block_size": 4,
        "max_num_batched_tokens": 16,  # long prompts are chunked beside other decodes
        "tensor_parallel_size": world_size,
        **options,
    }
    return Engine(EngineConfig(model=str(model_dir), **config))


def run_mixed(model_dir, dirs, world_size, requests, **options):
    engine = make_engine(model_dir, world_size, **options)
    try:
        slots = {}
        for slot, (name, path) in enumerate(dirs.items()):
            engine.load_adapter(slot, load_adapter_dir(path, engine.spec, 16))
            slots[name] = slot
        plan = {
            rid: (prompt, greedy(12), None if a is None else slots[a])
            for rid, prompt, a in requests
        }
        return run_to_completion(engine, plan), engine.stats()
    finally:
        engine.close()


@pytest.fixture(scope="module")
def llama(tiny_models, tmp_path_factory):
    """The tiny Llama with three adapters of mixed ranks and targets, and PEFT over them."""
    model_dir = tiny_models["llama2"]
    dirs, peft_model = adapters_with_peft(model_dir, tmp_path_factory.mktemp("tp"))
    return model_dir, dirs, peft_model


def test_two_ranks_give_the_tokens_of_one_and_of_peft(llama):
    model_dir, dirs, peft_model = llama
    requests = requests_over_adapters(seed=3)
    one, _ = run_mixed(model_dir, dirs, 1, requests)
    two, stats = run_mixed(model_dir, dirs, 2, requests)
    assert two == one
    for rid, prompt, adapter in requests:
        assert two[rid] == expected_tokens(peft_model, prompt, adapter, 12), rid
    assert stats.num_running == 0


def test_two_ranks_under_preemption(llama):
    model_dir, dirs, _ = llama
    requests = requests_over_adapters(seed=4)
    options = {"num_kv_blocks": 24, "max_model_len": 64, "max_num_batched_tokens": 32}
    one, _ = run_mixed(model_dir, dirs, 1, requests, **options)
    two, stats = run_mixed(model_dir, dirs, 2, requests, **options)
    assert stats.num_preemptions > 0
    assert two == one


def test_replicated_kv_heads_padded_vocab_tied_head_and_biases(tmp_path):
    """One KV head for two ranks (each holds a copy), a vocabulary of 251 rows (not a
    multiple of 2: the last rank's rows are padded), a tied LM head, and q/k/v and o biases:
    the row-parallel o bias is added once, after the sum."""
    model_dir = save_tiny_model(
        tmp_path / "m",
        "llama-tied-bias",
        seed=7,
        num_key_value_heads=1,
        vocab_size=251,
    )
    adapter = save_random_adapter(
        model_dir, tmp_path / "a", 8, ADAPTERS["all8"]["targets"], seed=5
    )
    gen = torch.Generator().manual_seed(9)
    requests = [
        (f"r{i}", torch.randint(0, 251, (n,), generator=gen).tolist(), name)
        for i, (n, name) in enumerate([(19, "all8"), (6, None), (11, "all8")])
    ]
    one, _ = run_mixed(model_dir, {"all8": adapter}, 1, requests)
    two, _ = run_mixed(model_dir, {"all8": adapter}, 2, requests)
    assert two == one
    assert one["r0"] != one["r1"][: len(one["r0"])]


def test_unloading_and_reloading_a_slot_reaches_every_rank(llama):
    model_dir, dirs, peft_model = llama
    engine = make_engine(model_dir, 2)
    try:
        prompt = list(range(5, 25))
        engine.load_adapter(0, load_adapter_dir(dirs["qv4"], engine.spec, 16))
        engine.unload_adapter(0)
        engine.load_adapter(0, load_adapter_dir(dirs["mlp16"], engine.spec, 16))
        got = run_to_completion(engine, {"x": (prompt, greedy(8), 0)})
        assert got["x"] == expected_tokens(peft_model, prompt, "mlp16", 8)
    finally:
        engine.close()


def test_a_dead_worker_stops_the_engine_with_a_clear_error(llama, caplog):
    model_dir = llama[0]
    engine = make_engine(model_dir, 2)
    thread = EngineThread(engine).start()
    try:
        outputs = []
        thread.add_request(
            "long",
            list(range(1, 9)),
            SamplingParams(max_tokens=200),
            None,
            outputs.append,
        ).result(10)
        worker = engine.workers.processes[0]
        with caplog.at_level(logging.ERROR):
            os.kill(worker.pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while thread.alive and time.monotonic() < deadline:
                time.sleep(0.1)
        assert not thread.alive, "the engine kept running without its worker"
        assert outputs and outputs[-1].finished  # the request ended, it did not hang
        assert any("loraplex-tp-rank1" in r.getMessage() for r in caplog.records)
        with pytest.raises(TensorParallelError, match="exited"):
            engine.workers.clear_slot(0)
    finally:
        thread.stop()
        engine.close()


def test_sizes_that_do_not_split_are_refused_by_name(tiny_models):
    spec = ModelSpec.from_dir(tiny_models["llama2"])  # 4 heads, 2 KV heads, 96 inter
    with pytest.raises(ModelLoadError, match="num_attention_heads"):
        check_shardable(spec, 3)
    check_shardable(spec, 4)  # KV heads replicated: 2 divides 4
    local = shard_spec(spec, TensorParallel(1, 4))
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (1, 1, 24)


def test_adapter_shards_cover_the_adapter_and_survive_the_wire(llama):
    model_dir, dirs, _ = llama
    spec = ModelSpec.from_dir(model_dir)
    weights = load_adapter_dir(dirs["all8"], spec, 16)
    shards = [shard_lora_weights(weights, spec, TensorParallel(r, 2)) for r in (0, 1)]
    for key, module in weights.modules.items():
        target = key[1]
        parts = [s.modules[key] for s in shards]
        if target in ("o", "down"):  # A split by input, B whole
            torch.testing.assert_close(
                torch.cat([p.lora_a for p in parts], dim=1), module.lora_a
            )
            assert all(torch.equal(p.lora_b, module.lora_b) for p in parts)
        else:  # A whole, B split by output
            torch.testing.assert_close(
                torch.cat([p.lora_b for p in parts], dim=0), module.lora_b
            )
            assert all(torch.equal(p.lora_a, module.lora_a) for p in parts)
    back = unpack_adapter(*pack_adapter(shards[1]))
    for key, module in shards[1].modules.items():
        assert torch.equal(back.modules[key].lora_a, module.lora_a.float())
        assert torch.equal(back.modules[key].lora_b, module.lora_b.float())
        assert back.modules[key].scale == module.scale


def test_rank_major_b_shards_stay_rank_major_and_survive_the_wire(llama):
    """B as an [out, rank] view of rank-major storage (the slots' layout): each shard's
    B is dense and still rank-major, so that its copy into a slot stays dense, with the
    values of the out-major shard; the wire carries the logical values."""
    model_dir, dirs, _ = llama
    spec = ModelSpec.from_dir(model_dir)
    weights = load_adapter_dir(dirs["all8"], spec, 16)
    packed_like = LoraWeights(
        {
            key: LoraModuleWeights(m.lora_a, rank_major(m.lora_b), m.scale)
            for key, m in weights.modules.items()
        }
    )
    for rank in (0, 1):
        shard = shard_lora_weights(packed_like, spec, TensorParallel(rank, 2))
        plain = shard_lora_weights(weights, spec, TensorParallel(rank, 2))
        back = unpack_adapter(*pack_adapter(shard))
        for key, module in plain.modules.items():
            got = shard.modules[key]
            assert got.lora_b.T.is_contiguous() and got.lora_a.is_contiguous()
            assert torch.equal(got.lora_b, module.lora_b)
            assert torch.equal(got.lora_a, module.lora_a)
            assert torch.equal(back.modules[key].lora_b, module.lora_b.float())


def test_a_step_survives_the_wire(llama):
    model_dir, _, _ = llama
    engine = make_engine(model_dir, 1, max_loras=0)
    for i, n in enumerate((9, 3, 30)):
        engine.add_request(f"r{i}", list(range(1, n + 1)), greedy(4), None)
    batch = engine.scheduler.schedule()
    back = unpack_batch(pack_batch(batch))
    assert len(back.sequences) == len(batch.sequences)
    for got, want in zip(back.sequences, batch.sequences, strict=True):
        assert (got.start, got.num_new_tokens, got.block_ids, got.samples) == (
            want.start,
            want.num_new_tokens,
            want.block_ids,
            want.samples,
        )
        assert got.token_ids == want.token_ids
        assert got.request.slot == want.request.slot


def test_block_tables_travel_as_they_change(llama):
    """Step after step, a worker rebuilds every batch from what changed: tables that grow, a
    request preempted and recomputed, one aborted; a steady decode step sends no block id."""
    model_dir, _, _ = llama
    engine = make_engine(model_dir, 1, max_loras=0, num_kv_blocks=24, max_model_len=64)
    for i, n in enumerate((9, 3, 30, 5)):
        engine.add_request(f"r{i}", list(range(1, n + 1)), greedy(12), None)
    sender, receiver = BatchSender(), BatchReceiver()
    scheduler = engine.scheduler
    steady = sent_blocks = whole_blocks = 0
    for step in range(40):
        if step == 6:
            assert scheduler.preempt("r1")  # recomputed later, with new blocks
        if step == 9:
            engine.abort("r0")
        batch = scheduler.schedule()
        if batch.is_empty:
            break
        packed = sender.pack(batch)
        back = receiver.unpack(packed)
        for got, want in zip(back.sequences, batch.sequences, strict=True):
            assert (got.start, got.num_new_tokens, got.block_ids, got.samples) == (
                want.start,
                want.num_new_tokens,
                want.block_ids,
                want.samples,
            )
            assert got.token_ids == want.token_ids
        headers_and_tokens = sum(7 + seq.num_new_tokens for seq in batch.sequences)
        sent_blocks += packed.numel() - 1 - headers_and_tokens
        whole_blocks += sum(len(seq.block_ids) for seq in batch.sequences)
        steady += packed.numel() == 1 + headers_and_tokens
        scheduler.update(batch, [7] * len(batch.sampling_sequences))
    assert steady > 0 and sent_blocks < whole_blocks / 3
    assert engine.scheduler.num_preemptions >= 1


@pytest.mark.parametrize("arch", ["qwen3", "mistral", "qwen2", "llama3.1"])
def test_every_family_splits_over_two_ranks(tiny_models, arch):
    """Per-head q/k norms (Qwen3), sliding windows (Mistral), q/k/v biases with a tied head
    (Qwen2), Llama-3 rope scaling: 2 ranks give the greedy tokens of 1."""
    gen = torch.Generator().manual_seed(21)
    requests = [
        (f"r{i}", torch.randint(0, 256, (n,), generator=gen).tolist(), None)
        for i, n in enumerate((23, 4, 15))
    ]
    one, _ = run_mixed(tiny_models[arch], {}, 1, requests, max_loras=0)
    two, _ = run_mixed(tiny_models[arch], {}, 2, requests, max_loras=0)
    assert two == one


def test_cached_prefix_blocks_hold_every_ranks_keys(llama):
    """A prompt that reuses a cached prefix reads the KV blocks each rank wrote for the first
    one: 2 ranks give the tokens of 1, with prefix-cache hits."""
    model_dir = llama[0]
    prefix = list(range(7, 39))  # 32 tokens: 8 full blocks of 4
    runs = {}
    for size in (1, 2):
        engine = make_engine(model_dir, size, max_loras=0)
        try:
            first = run_to_completion(engine, {"a": (prefix + [3, 1], greedy(6), None)})
            second = run_to_completion(
                engine, {"b": (prefix + [9, 2], greedy(6), None)}
            )
            runs[size] = (first, second, engine.stats().prefix_cache_hits)
        finally:
            engine.close()
    assert runs[2][:2] == runs[1][:2]
    assert runs[2][2] >= 32 and runs[1][2] >= 32
