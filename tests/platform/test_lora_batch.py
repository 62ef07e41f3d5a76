"""Many adapters in one in-flight batch give, request by request, what transformers + PEFT give."""

from __future__ import annotations

import pytest
import torch
import transformers
from engine_utils import greedy, hf_greedy, run_to_completion
from peft import PeftModel

from checkpoints import save_random_adapter
from loraplex.adapters_registry import load_adapter_dir
from loraplex.platform import Engine, EngineConfig

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # three ranks, three target sets, rsLoRA, and per-module rank/alpha patterns
    "qv4": {"rank": 4, "targets": ["q_proj", "v_proj"]},
    "all8": {"rank": 8, "targets": ALL, "use_rslora": True},
    "mlp16": {
        "rank": 16,
        "targets": ["gate_proj", "up_proj", "down_proj", "o_proj"],
        "rank_pattern": {"down_proj": 6},
        "alpha_pattern": {"o_proj": 5},
    },
}


def adapters_with_peft(model_dir, root):
    """ADAPTERS saved under `root` for the checkpoint, and transformers + PEFT holding them all."""
    dirs = {}
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        options = {k: v for k, v in spec.items() if k not in ("rank", "targets")}
        dirs[name] = save_random_adapter(
            model_dir,
            root / name,
            spec["rank"],
            spec["targets"],
            seed=10 + i,
            **options,
        )
    base = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32
    )
    names = list(dirs)
    peft_model = PeftModel.from_pretrained(base, dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(dirs[name], adapter_name=name)
    peft_model.eval()
    return dirs, peft_model


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    model_dir = tiny_models["llama2"]
    dirs, peft_model = adapters_with_peft(
        model_dir, tmp_path_factory.mktemp("adapters")
    )
    return model_dir, dirs, peft_model


def requests_over_adapters(seed: int):
    """10 requests over 3 adapters and the base, prompts of 3 to 37 tokens."""
    gen = torch.Generator().manual_seed(seed)
    plan = ["qv4", None, "all8", "mlp16", "qv4", "all8", None, "mlp16", "all8", "qv4"]
    lengths = [37, 5, 21, 3, 14, 30, 9, 26, 12, 18]
    return [
        (f"r{i}", torch.randint(0, 256, (n,), generator=gen).tolist(), adapter)
        for i, (adapter, n) in enumerate(zip(plan, lengths, strict=True))
    ]


def expected_tokens(peft_model, prompt, adapter, max_tokens):
    if adapter is None:
        with peft_model.disable_adapter():
            return hf_greedy(peft_model, prompt, max_tokens)
    peft_model.set_adapter(adapter)
    return hf_greedy(peft_model, prompt, max_tokens)


def run_engine(model_dir, dirs, requests, max_tokens, **options):
    config = {
        "dtype": "float32",
        "device": "cpu",
        "max_loras": 3,
        "max_lora_rank": 16,
        "block_size": 4,
        **options,
    }
    engine = Engine(EngineConfig(model=str(model_dir), **config))
    slots = {}
    for slot, (name, path) in enumerate(dirs.items()):
        engine.load_adapter(slot, load_adapter_dir(path, engine.spec, 16))
        slots[name] = slot
    plan = {
        rid: (prompt, greedy(max_tokens), None if a is None else slots[a])
        for rid, prompt, a in requests
    }
    return engine, run_to_completion(engine, plan)


def test_mixed_batch_matches_peft_request_by_request(setup):
    model_dir, dirs, peft_model = setup
    requests = requests_over_adapters(seed=1)
    # 16 tokens a step: long prompts are chunked and share steps with other requests' decodes.
    _, got = run_engine(model_dir, dirs, requests, 12, max_num_batched_tokens=16)
    for rid, prompt, adapter in requests:
        assert got[rid] == expected_tokens(peft_model, prompt, adapter, 12), (
            rid,
            adapter,
        )
    # The adapters matter: the same prompt answers differently under each of them.
    prompt = requests[0][1]
    answers = {
        str(a): expected_tokens(peft_model, prompt, a, 12) for a in (None, *dirs)
    }
    assert len(set(map(tuple, answers.values()))) == len(answers)


def test_preemption_leaves_outputs_unchanged(setup):
    model_dir, dirs, peft_model = setup
    requests = requests_over_adapters(seed=2)
    # 24 blocks of 4 tokens: less than the 10 requests need together, enough for any one.
    engine, got = run_engine(
        model_dir,
        dirs,
        requests,
        12,
        max_num_batched_tokens=32,
        num_kv_blocks=24,
        max_model_len=64,
    )
    assert engine.stats().num_preemptions > 0
    for rid, prompt, adapter in requests:
        assert got[rid] == expected_tokens(peft_model, prompt, adapter, 12), (
            rid,
            adapter,
        )
    assert engine.stats().num_free_kv_blocks == 24  # every block came back
