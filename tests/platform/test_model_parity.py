"""The engine's Llama-family model against transformers, architecture by architecture (fp32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from engine_utils import greedy, hf_greedy, run_to_completion

from checkpoints import ARCHITECTURES
from loraplex.platform import Engine, EngineConfig, SamplingParams
from loraplex.platform.inputs import prepare_inputs


def make_engine(model_dir, **options) -> Engine:
    defaults = {"dtype": "float32", "device": "cpu", "max_loras": 0, "block_size": 4}
    return Engine(EngineConfig(model=str(model_dir), **{**defaults, **options}))


def prefill_logits(engine: Engine, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits at every prompt position, from one batched prefill through the engine's path."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p{i}", prompt, SamplingParams(max_tokens=1))
    batch = engine.scheduler.schedule()
    assert [s.num_new_tokens for s in batch.sequences] == [len(p) for p in prompts]
    inputs = prepare_inputs(batch, engine.config.block_size, engine.device, False)
    every_position = torch.arange(inputs.input_ids.shape[0])
    logits = engine.model(
        dataclasses.replace(inputs, logits_indices=every_position), engine.kv_cache
    )
    return list(logits.split([len(p) for p in prompts]))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_prefill_logits_match_transformers(arch, tiny_models):
    model_dir = tiny_models[arch]
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (23, 5, 40)]
    ours = prefill_logits(make_engine(model_dir, max_num_batched_tokens=128), prompts)
    for prompt, logits in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].float()
        rel = ((logits - ref).norm() / ref.norm()).item()
        assert rel < 1e-4, f"{arch}: relative error {rel:.2e}"


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_32_greedy_tokens_match_transformers(arch, tiny_models):
    model_dir = tiny_models[arch]
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(11)
    prompts = {
        f"r{i}": torch.randint(0, 256, (n,), generator=gen).tolist()
        for i, n in enumerate((17, 3, 30))
    }
    # A budget of 8 tokens a step forces chunked prefills that share steps with decodes.
    engine = make_engine(model_dir, max_num_batched_tokens=8)
    got = run_to_completion(
        engine, {rid: (p, greedy(32), None) for rid, p in prompts.items()}
    )
    for rid, prompt in prompts.items():
        assert got[rid] == hf_greedy(hf, prompt, 32), f"{arch} request {rid}"


def test_sharded_checkpoint_and_bf16_load(tmp_path):
    from checkpoints import save_tiny_model

    model_dir = tmp_path / "sharded"
    save_tiny_model(model_dir, "llama3.1", seed=3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32
    )
    hf.save_pretrained(tmp_path / "sharded2", max_shard_size="20KB")
    assert (tmp_path / "sharded2" / "model.safetensors.index.json").is_file()
    prompt = list(range(5, 25))
    ours = prefill_logits(make_engine(tmp_path / "sharded2"), [prompt])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-4
    bf16 = prefill_logits(
        make_engine(tmp_path / "sharded2", dtype="bfloat16"), [prompt]
    )[0]
    assert (
        (bf16 - ref).norm() / ref.norm()
    ).item() < 5e-2  # bf16 rounding, not a wrong model


def test_dummy_weights_have_the_right_shapes_and_are_not_zero(tiny_models):
    engine = make_engine(tiny_models["qwen3"], load_format="dummy", dtype="float16")
    params = dict(engine.model.named_parameters())
    assert params["layers.0.self_attn.qkv_proj.weight"].shape == (
        4 * 24 + 2 * 2 * 24,
        64,
    )
    assert all(p.dtype == torch.float16 and p.abs().sum() > 0 for p in params.values())
    got = run_to_completion(engine, {"r": ([1, 2, 3], greedy(4), None)})
    assert len(got["r"]) == 4
