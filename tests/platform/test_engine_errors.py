"""Bad input gets a clear error naming the problem, and the engine keeps serving."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from engine_utils import greedy, run_to_completion
from safetensors.torch import load_file, save_file

from checkpoints import save_random_adapter, save_tiny_model
from loraplex.adapters_registry import AdapterInvalid, load_adapter_dir
from loraplex.platform import (
    AdapterShapeError,
    Engine,
    EngineConfig,
    InvalidRequestError,
    ModelLoadError,
)


def engine_for(model_dir, **options):
    config = {"dtype": "float32", "device": "cpu", "max_loras": 2, "max_lora_rank": 8}
    return Engine(EngineConfig(model=str(model_dir), **{**config, **options}))


def copy_model(tiny_models, tmp_path, name="m"):
    return shutil.copytree(tiny_models["llama2"], tmp_path / name)


def test_missing_model_directory(tmp_path):
    with pytest.raises(ModelLoadError, match=r"config\.json not found"):
        engine_for(tmp_path / "nope")


def test_unsupported_architecture(tiny_models, tmp_path):
    model = copy_model(tiny_models, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError, match="unsupported architecture GPT2LMHeadModel"
    ):
        engine_for(model)


def test_unsupported_rope_scaling_is_named(tiny_models, tmp_path):
    model = copy_model(tiny_models, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="rope type 'yarn'"):
        engine_for(model)


def test_corrupt_checkpoint(tiny_models, tmp_path):
    model = copy_model(tiny_models, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        engine_for(model)


def test_missing_tensor_is_named(tiny_models, tmp_path):
    model = copy_model(tiny_models, tmp_path)
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(
        ModelLoadError, match=r"lacks tensor model\.layers\.1\.mlp\.down_proj"
    ):
        engine_for(model)


def test_wrong_tensor_shape_is_named(tiny_models, tmp_path):
    model = copy_model(tiny_models, tmp_path)
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.randn(8, 64)
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"k_proj\.weight: shape \(8, 64\)"):
        engine_for(model)


def test_pickle_only_checkpoint_is_refused(tiny_models, tmp_path):
    model = copy_model(tiny_models, tmp_path)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="never unpickles"):
        engine_for(model)


@pytest.fixture(scope="module")
def engine(tiny_models):
    return engine_for(tiny_models["llama2"], max_model_len=64)


def test_adapter_for_another_model_size(tiny_models, tmp_path, engine):
    other = save_tiny_model(
        tmp_path / "wide", "llama2", hidden_size=32, intermediate_size=48
    )
    adapter = save_random_adapter(other, tmp_path / "a", 4, ["q_proj", "down_proj"])
    with pytest.raises(
        AdapterInvalid,
        match=r"down_proj: lora_A has shape \(4, 48\), expected \(4, 96\)",
    ):
        load_adapter_dir(adapter, engine.spec, 8)


def test_adapter_for_another_architecture(tmp_path, engine):
    adapter = tmp_path / "gpt2"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}
        )
    )
    name = "base_model.model.transformer.h.0.attn.c_attn"
    save_file(
        {
            f"{name}.lora_A.weight": torch.randn(4, 64),
            f"{name}.lora_B.weight": torch.randn(192, 4),
        },
        adapter / "adapter_model.safetensors",
    )
    with pytest.raises(
        AdapterInvalid, match="not a LoRA weight of a Llama-family decoder layer"
    ):
        load_adapter_dir(adapter, engine.spec, 8)


def test_adapter_rank_above_the_slots(tiny_models, tmp_path, engine):
    adapter = save_random_adapter(
        tiny_models["llama2"], tmp_path / "r16", 16, ["v_proj"]
    )
    with pytest.raises(AdapterInvalid, match="rank 16 exceeds max_lora_rank 8"):
        load_adapter_dir(adapter, engine.spec, 8)


def test_bad_requests_are_refused_and_the_engine_keeps_serving(
    tiny_models, tmp_path, engine
):
    adapter = save_random_adapter(tiny_models["llama2"], tmp_path / "ok", 4, ["q_proj"])
    with pytest.raises(
        InvalidRequestError, match=r"70 tokens\) plus max_tokens \(8\).*64"
    ):
        engine.add_request("long", list(range(70)), greedy(8))
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        engine.add_request("empty", [], greedy(8))
    with pytest.raises(InvalidRequestError, match=r"token ids must be in \[0, 256\)"):
        engine.add_request("oov", [1, 999], greedy(8))
    with pytest.raises(InvalidRequestError, match="slot 1 holds no adapter"):
        engine.add_request("noslot", [1, 2], greedy(8), slot=1)
    with pytest.raises(AdapterShapeError, match="slot 5 out of range"):
        engine.load_adapter(5, load_adapter_dir(adapter, engine.spec, 8))
    engine.load_adapter(0, load_adapter_dir(adapter, engine.spec, 8))
    engine.add_request("busy", [1, 2, 3], greedy(4), slot=0)
    with pytest.raises(AdapterShapeError, match="slot 0 is in use"):
        engine.unload_adapter(0)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("busy", [1], greedy(1))
    got = run_to_completion(engine, {"fine": ([5, 6, 7], greedy(6), None)})
    assert len(got["fine"]) == 6
    assert not engine.has_unfinished_requests
    engine.unload_adapter(0)  # free again once its request finished


def test_abort_ends_a_request_with_reason_abort(engine):
    engine.add_request("a", [1, 2, 3], greedy(20))
    engine.step()
    assert engine.abort("a")
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason.value) for o in outputs] == [("a", "abort")]
    assert not engine.abort("a") and not engine.has_unfinished_requests
    assert engine.stats().num_free_kv_blocks == engine.stats().num_kv_blocks
