"""ModelSpec reads both the transformers 4 and 5 layouts of config.json."""

from __future__ import annotations

import pytest

from loraplex.platform import EngineConfig, ModelLoadError, ModelSpec

LLAMA31_V4 = {  # the shape of Llama-3.1-8B's config.json as published (transformers 4.x)
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16",
}


def test_llama31_layout():
    spec = ModelSpec.from_config(LLAMA31_V4)
    assert spec.head_dim == 128 and spec.kv_size == 1024 and spec.q_size == 4096
    assert spec.rope.rope_type == "llama3" and spec.rope.theta == 500000.0
    assert spec.rope.original_max_position_embeddings == 8192
    assert spec.eos_token_ids == (128001, 128008, 128009)
    assert spec.checkpoint_dtype == "bfloat16"
    assert spec.lora_shape("down") == (14336, 4096)
    assert spec.sliding_windows == (None,) * 32


def test_mistral_window_and_qwen_layer_types():
    mistral = {
        **LLAMA31_V4,
        "architectures": ["MistralForCausalLM"],
        "sliding_window": 4096,
    }
    del mistral["rope_scaling"]
    assert ModelSpec.from_config(mistral).sliding_windows == (4096,) * 32
    qwen = {
        **mistral,
        "architectures": ["Qwen2ForCausalLM"],
        "use_sliding_window": True,
        "layer_types": ["full_attention"] * 30 + ["sliding_attention"] * 2,
    }
    spec = ModelSpec.from_config(qwen)
    assert spec.sliding_windows[-1] == 4096 and spec.sliding_windows[0] is None
    assert spec.qkv_bias and not spec.o_bias


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["BertModel"]}, "unsupported architecture BertModel"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"num_key_value_heads": 5}, "not a multiple"),
        ({"vocab_size": None}, "missing required field 'vocab_size'"),
    ],
)
def test_bad_configs_are_named(change, message):
    with pytest.raises(ModelLoadError, match=message):
        ModelSpec.from_config({**LLAMA31_V4, **change})


def test_engine_config_refuses_out_of_range_values():
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(model="x", max_num_seqs=0)
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(model="x", dtype="int8")
