"""`bench adapters` writes what PEFT writes: the registry's validator accepts it, peft loads it,
and bfloat16 is rounded the way torch rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from loraplex.adapters_registry import validate_adapter_bytes
from loraplex.loadgen import BaseShapes, random_adapter
from loraplex.loadgen.adapters import safetensors_bytes
from loraplex.platform import ModelSpec


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_random_adapter_passes_the_registry_validation(demo_assets, dtype):
    shapes = BaseShapes.from_model_dir(demo_assets.model)
    config, weights = random_adapter(shapes, rank=8, seed=1, dtype=dtype)
    spec = ModelSpec.from_dir(demo_assets.model)
    checked = validate_adapter_bytes(config, weights, spec, max_lora_rank=16)
    assert checked.rank == 8
    assert checked.targets == ("q", "k", "v", "o", "gate", "up", "down")
    tensors = load_safetensors(weights)
    assert len(tensors) == 2 * 7 * spec.num_layers
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"]
    assert a.shape == (8, spec.hidden_size) and b.shape == (spec.hidden_size, 8)
    assert a.dtype == getattr(torch, dtype) and b.abs().max() > 0
    assert random_adapter(shapes, 8, 1, dtype=dtype) == (config, weights)  # seeded


def test_a_subset_of_targets(demo_assets):
    shapes = BaseShapes.from_model_dir(demo_assets.model)
    config, weights = random_adapter(shapes, 4, 0, targets=("q_proj", "v_proj"))
    spec = ModelSpec.from_dir(demo_assets.model)
    assert validate_adapter_bytes(config, weights, spec, 8).targets == ("q", "v")
    with pytest.raises(ValueError, match="targets"):
        random_adapter(shapes, 4, 0, targets=("lm_head",))


def test_bfloat16_rounds_to_nearest_even_like_torch():
    values = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    values[:4] = [1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0, 65504.0]  # ties and edges
    loaded = load_safetensors(safetensors_bytes({"x": (values, "bfloat16")}))["x"]
    expected = torch.from_numpy(values).to(torch.bfloat16)
    assert torch.equal(loaded, expected)


def test_shapes_from_config_with_explicit_head_dim(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96, '
        '"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24}'
    )
    shapes = BaseShapes.from_model_dir(tmp_path)
    assert shapes.linear("q_proj") == (64, 96) and shapes.linear("o_proj") == (96, 64)
    assert shapes.linear("k_proj") == (64, 48)
    with pytest.raises(ValueError, match="config.json"):
        BaseShapes.from_model_dir(tmp_path / "missing")
