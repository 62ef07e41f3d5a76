"""Tiny random checkpoints and PEFT adapters in the real Hugging Face layout (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "eos_token_id": None,
    "bos_token_id": None,
    "pad_token_id": None,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
# Every supported family, with the option that sets it apart from plain Llama.
ARCHITECTURES = {
    "llama2": ("LlamaConfig", {}),
    "llama3.1": ("LlamaConfig", {"rope_scaling": LLAMA3_ROPE}),
    "llama-tied-bias": (
        "LlamaConfig",
        {"tie_word_embeddings": True, "attention_bias": True},
    ),
    "mistral": ("MistralConfig", {"sliding_window": 12, "head_dim": 16}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 24}),
}


def save_tiny_model(
    path: Path, arch: str = "llama2", seed: int = 0, **overrides
) -> Path:
    """A random tiny checkpoint of `arch` written by transformers' save_pretrained (fp32)."""
    import transformers

    config_class, options = ARCHITECTURES[arch]
    config = getattr(transformers, config_class)(
        **{**TINY_SHAPE, **options, **overrides}
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    return path


def save_random_adapter(
    model_dir: Path, path: Path, rank: int, targets: list[str], seed: int = 0, **lora
) -> Path:
    """A PEFT LoRA adapter with random A and B (so it changes the output), saved by peft."""
    import transformers
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32
    )
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=lora.pop("lora_alpha", 2 * rank),
        target_modules=targets,
        init_lora_weights=False,
        **lora,
    )
    model = get_peft_model(base, config)
    with torch.no_grad():  # keep the update of the order of the base weights
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.2)
    model.save_pretrained(path)
    return path
