"""The FP8 engine (quantization="fp8") on a tiny checkpoint: close to the unquantized engine,
with and without LoRA adapters on top; quantizing at load equals quantizing after load.

Tolerances, from e4m3's 3 mantissa bits (≈2.5% rms error per weight, averaging out over the dot
products): logits within 6% (relative L2) of the float32 engine's, top-1 agreement at 90% or
more, mean KL below 1e-4; greedy decoding gives the same 16 tokens for most prompts. On this
model (random weights, flat logits: the hardest case for top-1) the measured figures are 2.8%,
100%, 1.2e-5 and 7 of 8.
"""

from __future__ import annotations

import pytest
import torch
from engine_utils import greedy, run_to_completion

from checkpoints import save_random_adapter, save_tiny_model
from loraplex.adapters_registry import load_adapter_dir
from loraplex.kernels.fp8 import FP8_DTYPE
from loraplex.platform import Engine, EngineConfig
from loraplex.platform.engine_build import (
    compare_logits,
    gate_prompts,
    prompt_logits,
    quantize_model_,
)
from loraplex.platform.model import LlamaForCausalLM, load_weights

ARCH = "llama-tied-bias"  # q/k/v and o biases, tied LM head
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    model = tiny_models[ARCH]
    root = tmp_path_factory.mktemp("fp8")
    adapters = [
        save_random_adapter(model, root / "a8", 8, ALL, seed=1),
        save_random_adapter(model, root / "a4", 4, ["q_proj", "down_proj"], seed=2),
    ]
    engines = {}
    for quantization in ("none", "fp8"):
        engine = Engine(
            EngineConfig(
                model=str(model),
                device="cpu",
                quantization=quantization,
                max_loras=2,
                max_lora_rank=8,
            )
        )
        for slot, path in enumerate(adapters):
            engine.load_adapter(slot, load_adapter_dir(path, engine.spec, 8))
        engines[quantization] = engine
    return model, engines


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat(a).double(), torch.cat(b).double()
    return float((a - b).norm() / b.norm())


def test_linear_weights_are_fp8_and_the_rest_is_not(setup):
    _, engines = setup
    model = engines["fp8"].model
    for linears in model.lora_linears():
        for linear in linears.values():
            assert linear.weight.dtype == FP8_DTYPE
            assert linear.weight_scale.shape == (linear.weight.shape[0], 1)
            assert linear.weight_scale.dtype == torch.float32
            assert linear.bias is None or linear.bias.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == torch.float32
    assert model.norm.weight.dtype == torch.float32


def test_logits_close_to_the_unquantized_engine(setup):
    _, engines = setup
    prompts = gate_prompts(engines["none"].spec.vocab_size, 48)
    reference = prompt_logits(engines["none"].model, prompts)
    quantized = prompt_logits(engines["fp8"].model, prompts)
    gate = compare_logits(reference, quantized)
    assert _relative(quantized, reference) < 0.06
    assert gate["top1_agreement"] >= 0.9
    assert 0 <= gate["mean_kl"] < 1e-4


def test_lora_on_fp8_follows_the_unquantized_engine_with_the_same_adapters(setup):
    _, engines = setup
    prompts = gate_prompts(engines["none"].spec.vocab_size, 32)
    slots = [0, 1, None, 0, 1, 0, None, 1]
    base = prompt_logits(engines["none"].model, prompts)
    reference = prompt_logits(engines["none"].model, prompts, slots, True)
    quantized = prompt_logits(engines["fp8"].model, prompts, slots, True)
    adapter_effect = _relative(base, reference)
    error = _relative(quantized, reference)
    assert adapter_effect > 0.2  # the adapters change the output a lot ...
    assert (
        error < 0.06 and error < 0.1 * adapter_effect
    )  # ... and FP8 keeps that change
    assert compare_logits(reference, quantized)["top1_agreement"] >= 0.9


def test_greedy_tokens_mostly_the_same(setup):
    _, engines = setup
    gen = torch.Generator().manual_seed(0)
    requests = {
        f"r{i}": (
            torch.randint(0, 256, (12,), generator=gen).tolist(),
            greedy(16),
            (None, 0, 1)[i % 3],
        )
        for i in range(8)
    }
    tokens = {q: run_to_completion(e, requests) for q, e in engines.items()}
    same = sum(tokens["none"][r] == tokens["fp8"][r] for r in requests)
    same_start = sum(tokens["none"][r][:4] == tokens["fp8"][r][:4] for r in requests)
    assert same >= 6 and same_start >= 7, (same, same_start)


def test_quantizing_at_load_equals_quantizing_the_loaded_model(setup):
    """`serve --quantization fp8` (per slice, as tensors arrive) and `build` (whole layers,
    after loading) give the same bytes."""
    model_dir, engines = setup
    at_load = engines["fp8"].model
    after = LlamaForCausalLM(
        at_load.spec, 256, torch.float32, torch.device("cpu")
    )  # unquantized
    load_weights(after, model_dir)
    quantize_model_(after)
    for ours, theirs in zip(at_load.lora_linears(), after.lora_linears(), strict=True):
        for group, linear in ours.items():
            other = theirs[group]
            assert torch.equal(
                linear.weight.view(torch.uint8), other.weight.view(torch.uint8)
            )
            assert torch.equal(linear.weight_scale, other.weight_scale)


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8-gpu") / "m"
    return save_tiny_model(path, "llama3.1", seed=5, max_position_embeddings=1024)


def _gpu_requests() -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(3)
    lengths = [
        5,
        600,
        17,
        64,
        1,
        129,
        300,
        2,
    ]  # 600 and 300: prefills above the buckets
    return {
        f"r{i}": (torch.randint(0, 256, (n,), generator=gen).tolist(), greedy(24), None)
        for i, n in enumerate(lengths)
    }


def _gpu_tokens(model, dtype: str, **options) -> dict[str, list[int]]:
    config = EngineConfig(
        model=str(model), device="cuda", dtype=dtype, max_loras=0, **options
    )
    engine = Engine(config)
    tokens = run_to_completion(engine, _gpu_requests())
    if not options.get("enforce_eager"):
        assert engine.runner.decode_graphs.num_replays > 0
    return tokens


@pytest.mark.gpu
def test_fp8_engine_on_the_gpu_graphs_give_the_eager_tokens(long_context_model):
    """fp32 activations (the Triton FP8 GEMMs at every size): decode graphs replay exactly
    what eager steps compute."""
    graphs = _gpu_tokens(long_context_model, "float32", quantization="fp8")
    eager = _gpu_tokens(
        long_context_model, "float32", quantization="fp8", enforce_eager=True
    )
    assert graphs == eager


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_fp8_engine_on_the_gpu_follows_bf16(long_context_model, enforce_eager):
    """bf16 activations: Triton GEMMs at decode sizes, _scaled_mm for the long prefills."""
    bf16 = _gpu_tokens(long_context_model, "bfloat16", enforce_eager=enforce_eager)
    fp8 = _gpu_tokens(
        long_context_model,
        "bfloat16",
        quantization="fp8",
        enforce_eager=enforce_eager,
    )
    same_start = sum(bf16[r][:4] == fp8[r][:4] for r in bf16)
    assert same_start >= 5, (bf16, fp8)
