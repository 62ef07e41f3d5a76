"""Prefix caching in the real engine (tiny fp32 checkpoint, CPU): the cache changes nothing but
the work done, and an adapter's cached KV is never read under other weights."""

from __future__ import annotations

import pytest
import torch
import transformers
from engine_utils import greedy, hf_greedy
from peft import PeftModel

from checkpoints import save_random_adapter
from loraplex.adapters_registry import load_adapter_dir
from loraplex.platform import Engine, EngineConfig, PrefixScope, SamplingParams

ADAPTERS = {
    "qv": (4, ["q_proj", "v_proj"]),
    "all": (
        8,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "mlp": (8, ["gate_proj", "up_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    model_dir = tiny_models["llama2"]
    root = tmp_path_factory.mktemp("prefix-adapters")
    dirs = {
        name: save_random_adapter(model_dir, root / name, rank, targets, seed=40 + i)
        for i, (name, (rank, targets)) in enumerate(ADAPTERS.items())
    }
    return model_dir, dirs


def make_engine(model_dir, dirs, **options) -> Engine:
    config = {
        "dtype": "float32",
        "device": "cpu",
        "max_loras": len(dirs),
        "max_lora_rank": 8,
        "block_size": 4,
        "max_num_batched_tokens": 24,
        "max_model_len": 64,
        **options,
    }
    engine = Engine(EngineConfig(model=str(model_dir), **config))
    for slot, path in enumerate(dirs.values()):
        engine.load_adapter(slot, load_adapter_dir(path, engine.spec, 8))
    return engine


def workload(seed: int):
    """Two waves over three adapters and the base: a shared 22-token system prompt with
    distinct questions, repeated whole prompts, the same prompt under every adapter and
    tenant, unshared prompts, and seeded sampling. (id, prompt, adapter, salt, params)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(n: int) -> list[int]:
        return torch.randint(0, 256, (n,), generator=gen).tolist()

    system = rand(22)
    questions = [rand(n) for n in (3, 7, 5, 9, 4, 6)]
    sampled = SamplingParams(max_tokens=6, temperature=0.9, seed=11, ignore_eos=True)
    plan = [
        ("qv", "t1", questions[0], greedy(6)),
        ("all", "t1", questions[1], greedy(8)),
        (None, "t1", questions[2], greedy(5)),
        ("mlp", "t2", questions[3], sampled),
        ("qv", "t2", questions[0], greedy(6)),  # the same prompt, another tenant
        (None, "t2", questions[2], greedy(5)),
    ]
    waves = []
    for wave in range(2):
        requests = [
            (f"w{wave}-{i}", system + q, adapter, salt, params)
            for i, (adapter, salt, q, params) in enumerate(plan)
        ]
        requests.append((f"w{wave}-solo", rand(13), "all", "t1", greedy(4)))
        requests.append(
            (f"w{wave}-again", system + questions[4], "qv", "t1", greedy(7))
        )
        waves.append(requests)
    return waves


def run_waves(engine: Engine, waves, digests: dict[str, str]):
    slots = {name: slot for slot, name in enumerate(ADAPTERS)}
    tokens: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    for wave in waves:
        for rid, prompt, adapter, salt, params in wave:
            slot = None if adapter is None else slots[adapter]
            digest = None if adapter is None else digests[adapter]
            engine.add_request(rid, prompt, params, slot, PrefixScope(digest, salt))
            tokens[rid] = []
        while engine.has_unfinished_requests:
            for out in engine.step():
                tokens[out.request_id].extend(out.new_token_ids)
                if out.finished:
                    cached[out.request_id] = out.num_cached_tokens
    return tokens, cached


DIGESTS = {name: f"sha256-of-{name}" for name in ADAPTERS}


@pytest.mark.parametrize(
    "kv", [{}, {"num_kv_blocks": 22}], ids=["roomy-cache", "small-cache-preempts"]
)
def test_outputs_are_identical_with_the_cache_on_and_off(setup, kv):
    model_dir, dirs = setup
    waves = workload(seed=3)
    on = make_engine(model_dir, dirs, **kv)
    off = make_engine(model_dir, dirs, enable_prefix_caching=False, **kv)
    got_on, cached_on = run_waves(on, waves, DIGESTS)
    got_off, cached_off = run_waves(off, waves, DIGESTS)
    assert got_on == got_off
    assert all(len(t) > 0 for t in got_on.values())
    stats = on.stats()
    assert (
        stats.prefix_cache_hits > 0
        and sum(cached_on.values()) == stats.prefix_cache_hits
    )
    assert off.stats().prefix_cache_hits == 0 and not any(cached_off.values())
    if kv:
        assert on.stats().num_preemptions > 0 and off.stats().num_preemptions > 0
    else:
        # The second wave's repeats hit: same adapter and tenant, from the prefix on.
        assert cached_on["w1-0"] >= 20 and cached_on["w1-4"] >= 20
        # The first wave's other tenant, and unshared prompts, found nothing of another's.
        assert cached_on["w0-solo"] == 0 and cached_on["w1-solo"] == 0


def test_a_new_adapter_in_the_same_slot_never_reads_the_old_ones_blocks(setup):
    model_dir, dirs = setup
    engine = make_engine(model_dir, {"qv": dirs["qv"]})
    prompt = list(range(30, 60))  # 7 full blocks of 4 and 2 tokens
    scope_old = PrefixScope("sha256-old", "t1")
    scope_new = PrefixScope("sha256-new", "t1")

    def generate(rid: str, slot: int, scope: PrefixScope) -> tuple[list[int], int]:
        engine.add_request(rid, prompt, greedy(8), slot, scope)
        tokens, num_cached = [], -1
        while engine.has_unfinished_requests:
            for out in engine.step():
                tokens += out.new_token_ids
                num_cached = out.num_cached_tokens
        return tokens, num_cached

    old_tokens, _ = generate("warm", 0, scope_old)
    assert generate("warm-again", 0, scope_old) == (old_tokens, 28)
    # The adapter is replaced in place: same slot, new weights, new content digest.
    engine.unload_adapter(0)
    engine.load_adapter(0, load_adapter_dir(dirs["mlp"], engine.spec, 8))
    new_tokens, num_cached = generate("replaced", 0, scope_new)
    assert num_cached == 0

    base = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32
    )
    peft_model = PeftModel.from_pretrained(base, dirs["mlp"]).eval()
    assert new_tokens == hf_greedy(peft_model, prompt, 8)
    assert new_tokens != old_tokens
    # The old digest's blocks can be dropped at once (a deleted adapter): they go first.
    assert (
        engine.forget_prefix(scope_old) == 7 + 2
    )  # 7 prompt blocks, 2 filled by decodes
    assert generate("after-forget", 0, scope_new)[1] == 28


def test_slot_without_a_digest_is_never_cached_and_salts_separate(setup):
    model_dir, dirs = setup
    engine = make_engine(model_dir, dirs)
    prompt = list(range(100, 121))

    def cached_tokens(rid: str, slot, scope) -> int:
        engine.add_request(rid, prompt, greedy(2), slot, scope)
        result = -1
        while engine.has_unfinished_requests:
            for out in engine.step():
                result = out.num_cached_tokens
        return result

    assert cached_tokens("a1", 0, None) == 0
    assert cached_tokens("a2", 0, None) == 0  # unknown weights: never shared
    assert cached_tokens("b1", None, PrefixScope(salt="t1")) == 0
    assert cached_tokens("b2", None, PrefixScope(salt="t2")) == 0
    assert cached_tokens("b3", None, PrefixScope(salt="t1")) == 20
    assert cached_tokens("b4", None, PrefixScope(salt=None)) == 0
    assert cached_tokens("b5", None, PrefixScope(salt=None)) == 20
