"""The standard workload of BENCHMARKS.md for bench_engine.py: model dir, adapters, floors, peer.

Llama-3.1-8B shapes with dummy weights; adapters of rank 16 (alpha 32) on all seven linears in
bf16; ceilings measured in the same process (device-to-device copy, bf16 and FP8 matmul at
8192³); the transformers + PEFT peer on the same card.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from loraplex.platform import LORA_TARGETS, LoraModuleWeights, LoraWeights, ModelSpec

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SMOKE = {  # the same code path on a CPU in seconds
    **LLAMA_8B,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
}
RANK, ALPHA = 16, 32
PEFT_TARGETS = [f"{t}_proj" for t in LORA_TARGETS]


def write_model_dir(root: Path, shapes: dict) -> Path:
    """A checkpoint directory holding only config.json (weights come from load_format=dummy)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(shapes))
    return root


def random_adapter(spec: ModelSpec, rank: int, seed: int) -> LoraWeights:
    """One adapter of `rank` on all seven linears of every layer, bf16, never zeros."""
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(spec.num_layers):
        for target in LORA_TARGETS:
            fan_in, fan_out = spec.lora_shape(target)
            a = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            b = torch.randn(fan_out, rank, generator=gen) / rank**0.5
            modules[(layer, target)] = LoraModuleWeights(
                a.bfloat16(), b.bfloat16(), ALPHA / rank
            )
    return LoraWeights(modules)


def adapter_read_bytes(spec: ModelSpec, rank: int) -> int:
    """Bytes of one adapter's A and B (bf16) that a step reads: rank rows, never max_rank."""
    per_layer = sum(
        rank * (fan_in + fan_out) * 2
        for fan_in, fan_out in map(spec.lora_shape, LORA_TARGETS)
    )
    return per_layer * spec.num_layers


def weight_read_bytes(model: torch.nn.Module, spec: ModelSpec) -> int:
    """Bytes a decode step reads of the base: every weight once, the embedding only by row."""
    seen, total = set(), 0
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in tensors:
        if "cos_cache" in name or "sin_cache" in name or tensor.data_ptr() in seen:
            continue
        if name.startswith("embed_tokens") and not spec.tie_word_embeddings:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def kv_bytes_per_token(spec: ModelSpec, dtype: torch.dtype) -> int:
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * dtype.itemsize


def median_time(fn, reps: int, device: torch.device) -> float:
    """Median wall seconds of `fn()` over `reps` calls, synchronized, after one warm-up."""
    fn()
    samples = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceilings(device: torch.device, smoke: bool) -> dict:
    """Copy bandwidth (bytes read + written) and dense bf16 / FP8 matmul rates at 8192³."""
    n = 1 << (20 if smoke else 30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = median_time(lambda: dst.copy_(src), 5 if smoke else 20, device)
    out = {"copy_GBps": 2 * n / copy_s / 1e9}
    if device.type != "cuda":
        return out
    size = 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    flops = 2 * size**3
    out["bf16_TFLOPs"] = flops / median_time(lambda: a @ b, 10, device) / 1e12
    a8 = a.to(torch.float8_e4m3fn)
    b8 = b.to(
        torch.float8_e4m3fn
    ).t()  # column-major, as _scaled_mm wants its second operand
    scale_a = torch.ones(size, 1, device=device)
    scale_b = torch.ones(1, size, device=device)

    def fp8_mm():
        return torch._scaled_mm(
            a8, b8, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16
        )

    out["fp8_TFLOPs"] = flops / median_time(fp8_mm, 10, device) / 1e12
    return out


def peer_generation(
    shapes: dict, batch: int, distinct: int, prompt_len: int, new_tokens: int
) -> dict:
    """transformers + PEFT `generate(adapter_names=...)` on the same card: tokens per second."""
    import transformers
    from peft import LoraConfig, get_peft_model

    config = transformers.AutoConfig.for_model(**shapes)
    with torch.device("cuda"):
        base = transformers.AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16
        )
    lora = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS, init_lora_weights=False
    )
    model = get_peft_model(base, lora, adapter_name="a0")
    for i in range(1, distinct):
        model.add_adapter(f"a{i}", lora)
    model = model.to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, shapes["vocab_size"], (batch, prompt_len), generator=gen)
    ids = ids.cuda()
    names = [f"a{i % distinct}" for i in range(batch)]

    def generate(tokens: int):
        with torch.inference_mode():
            return model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                adapter_names=names,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
            )

    generate(2)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    generate(new_tokens)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "batch": batch,
        "distinct_adapters": distinct,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_s": batch * new_tokens / seconds,
    }
    return result  # the caller collects the model and empties the cache
