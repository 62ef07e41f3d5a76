"""`loraplex build`: a checkpoint → an FP8 engine directory, with a quality gate.

1. Load the unquantized model on the device (safetensors, or dummy weights for benchmarks).
2. Logits at every position of a fixed set of token prompts (seeded, so every build of a model
   sees the same ones).
3. Quantize every q/k/v, o, gate/up and down linear in place, one layer at a time (the peak is
   the unquantized model plus one layer's e4m3 copy).
4. The same logits again; top-1 agreement and KL(unquantized ‖ FP8) go into engine.json.
5. Write the engine directory atomically (engine_dir.py).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .batch import ScheduledBatch, ScheduledSequence
from .config import DType, EngineConfig, ModelSpec, blocks_for
from .engine import _resolve_device, _resolve_dtype
from .engine_dir import device_record, is_engine_dir, write_engine_dir
from .errors import ModelLoadError
from .inputs import prepare_inputs
from .kv_cache import KVCache
from .model import LlamaForCausalLM, init_dummy_weights, load_weights
from .request import Request, SamplingParams

GATE_PROMPTS = 8
GATE_TOKENS = 64
GATE_SEED = 20261127
_BLOCK_SIZE = 16


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """What `loraplex build` was asked for (EngineConfig's meaning for the shared names)."""

    model: Path
    out: Path
    quantization: Literal["fp8"] = "fp8"
    max_num_seqs: int = 64
    max_model_len: int = 0
    max_lora_rank: int = 64
    dtype: DType = "auto"
    device: str = "auto"
    load_format: Literal["auto", "dummy"] = "auto"
    seed: int = 0
    progress: bool = True


def build_engine(
    options: BuildOptions, say: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Quantize once and write the engine directory; returns its engine.json record.

    :raises ModelLoadError: an unreadable checkpoint, or one that is already an engine.
    :raises FileExistsError: `options.out` exists.
    """
    if options.quantization != "fp8":
        raise ValueError(f"quantization {options.quantization!r}: only fp8 is built")
    if is_engine_dir(options.model):
        raise ModelLoadError(
            f"{options.model} is an engine already; build from a checkpoint"
        )
    if Path(options.out).exists():
        raise FileExistsError(
            f"{options.out} exists; choose another --out or remove it"
        )
    config = EngineConfig(  # validates the ranges as the engine would
        model=str(options.model),
        dtype=options.dtype,
        device=options.device,
        max_num_seqs=options.max_num_seqs,
        max_model_len=options.max_model_len,
        max_lora_rank=options.max_lora_rank,
        load_format=options.load_format,
        quantization=options.quantization,
        seed=options.seed,
    )
    spec = ModelSpec.from_dir(options.model)
    device = _resolve_device(config.device)
    dtype = _resolve_dtype(config.dtype, spec, device)
    max_model_len = config.max_model_len or spec.max_position_embeddings
    if max_model_len > spec.max_position_embeddings:
        raise ModelLoadError(
            f"max_model_len {max_model_len} exceeds the model's "
            f"max_position_embeddings {spec.max_position_embeddings}"
        )
    say(f"loading {options.model} ({config.load_format}) on {device} in {dtype}")
    model = LlamaForCausalLM(spec, max_model_len, dtype, device)
    if config.load_format == "dummy":
        init_dummy_weights(model, config.seed)
    else:
        load_weights(model, options.model, progress=options.progress)
    prompts = gate_prompts(spec.vocab_size, min(GATE_TOKENS, max_model_len))
    say(f"quality gate: {len(prompts)} prompts of {len(prompts[0])} tokens")
    reference = prompt_logits(model, prompts)
    quantize_model_(model, options.progress)
    gate = compare_logits(reference, prompt_logits(model, prompts))
    del reference
    gate.update(
        reference_dtype=str(dtype).removeprefix("torch."),
        prompts=len(prompts),
        tokens_per_prompt=len(prompts[0]),
        seed=GATE_SEED,
    )
    say(
        f"quality gate: top-1 agreement {100 * gate['top1_agreement']:.2f}%, "
        f"mean KL {gate['mean_kl']:.3e}"
    )
    record = {
        "engine": {
            "quantization": config.quantization,
            "dtype": str(dtype).removeprefix("torch."),
            "max_num_seqs": config.max_num_seqs,
            "max_model_len": max_model_len,
            "max_lora_rank": config.max_lora_rank,
        },
        "gpu": {**device_record(device), **_versions()},
        "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": {
            "model": str(Path(options.model).resolve()),
            "load_format": config.load_format,
            "seed": config.seed,
            "architecture": spec.architecture,
        },
        "quality_gate": gate,
    }
    say(f"writing {options.out}")
    write_engine_dir(
        Path(options.out), model, record, Path(options.model), options.progress
    )
    return record


def quantize_model_(model: LlamaForCausalLM, progress: bool = False) -> None:
    """Every LoRA-capable linear to e4m3 with per-row scales, in place, layer by layer."""
    layers = model.lora_linears()
    for linears in tqdm(layers, desc="quantizing", disable=not progress):
        for linear in linears.values():
            linear.quantize_()
        if next(iter(linears.values())).weight.is_cuda:
            torch.cuda.empty_cache()  # hand the unquantized layer's memory back at once


def gate_prompts(vocab_size: int, length: int) -> list[list[int]]:
    """GATE_PROMPTS fixed prompts of `length` token ids, drawn uniformly with GATE_SEED."""
    generator = torch.Generator().manual_seed(GATE_SEED)
    ids = torch.randint(0, vocab_size, (GATE_PROMPTS, length), generator=generator)
    return ids.tolist()


def prompt_logits(
    model: LlamaForCausalLM,
    prompts: list[list[int]],
    slots: list[int | None] | None = None,
    lora_enabled: bool = False,
) -> list[torch.Tensor]:
    """Logits [len(prompt), vocab] float32 at every position of each prompt, each prompt a
    prefill of its own in a scratch KV cache; `slots` gives each prompt's adapter slot."""
    param = model.embed_tokens.weight
    logits = []
    for i, prompt in enumerate(prompts):
        n = len(prompt)
        num_blocks = blocks_for(n, _BLOCK_SIZE)
        request = Request(
            request_id=f"gate-{i}",
            prompt_token_ids=list(prompt),
            sampling=SamplingParams(max_tokens=1),
            seed=0,
            slot=None if slots is None else slots[i],
        )
        sequence = ScheduledSequence(request, 0, n, tuple(range(num_blocks)), True)
        inputs = prepare_inputs(
            ScheduledBatch((sequence,)), _BLOCK_SIZE, param.device, lora_enabled
        )
        every = torch.arange(n, device=param.device)
        inputs = dataclasses.replace(inputs, logits_indices=every)
        cache = KVCache(model.spec, num_blocks, _BLOCK_SIZE, param.dtype, param.device)
        logits.append(model(inputs, cache))
    return logits


def compare_logits(
    reference: list[torch.Tensor], candidate: list[torch.Tensor]
) -> dict[str, float | int]:
    """Top-1 agreement and KL(softmax(reference) ‖ softmax(candidate)) over all positions."""
    agree, positions, kl_sum, kl_max = 0, 0, 0.0, 0.0
    for ref, cand in zip(reference, candidate, strict=True):
        log_p = F.log_softmax(ref.double(), dim=-1)
        log_q = F.log_softmax(cand.double(), dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp(min=0)
        agree += int((ref.argmax(dim=-1) == cand.argmax(dim=-1)).sum())
        positions += ref.shape[0]
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
    return {
        "positions": positions,
        "top1_agreement": agree / positions,
        "mean_kl": kl_sum / positions,
        "max_kl": kl_max,
    }


def _versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
    }
