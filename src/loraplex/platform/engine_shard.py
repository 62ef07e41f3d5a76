"""ModelShard: what one rank of an engine holds on its device: the model (its shard of it), the
adapter slots and the model runner with its KV cache and decode graphs.

Rank 0 builds one inside the Engine, the other tensor-parallel ranks inside their worker
processes, from the same arguments, so that every rank makes the same collective calls in the
same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import EngineConfig, ModelSpec
from .engine_dir import BuiltEngine
from .lora_slots import LoraSlots
from .model import LlamaForCausalLM, init_dummy_weights, load_weights
from .model_runner import ModelRunner
from .parallel import SINGLE, TensorParallel


@dataclass
class ModelShard:
    model: LlamaForCausalLM
    lora_slots: LoraSlots | None
    runner: ModelRunner


def build_shard(
    config: EngineConfig,
    spec: ModelSpec,
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
    built: BuiltEngine | None = None,
    tp: TensorParallel = SINGLE,
) -> ModelShard:
    """Build the model, fill its weights, attach adapter slots and start its runner.

    :raises ModelLoadError: the checkpoint or engine directory does not load.
    """
    model = LlamaForCausalLM(
        spec, max_model_len, dtype, device, quantization=config.quantization, tp=tp
    )
    if built is not None:  # quantized at build time: copied, not quantized
        built.load_weights(model)
    elif config.load_format == "dummy":
        init_dummy_weights(model, config.seed)
    else:
        load_weights(model, config.model)
    lora_slots = None
    if config.max_loras > 0:
        lora_slots = LoraSlots(
            spec, config.max_loras, config.max_lora_rank, dtype, device, tp
        )
        for layer_linears, layer_slots in zip(
            model.lora_linears(), lora_slots.layers, strict=True
        ):
            for group, linear in layer_linears.items():
                linear.lora = layer_slots[group]
                linear.sgmv_backend = config.lora_backend
    runner = ModelRunner(
        model,
        spec,
        config,
        device=device,
        dtype=dtype,
        max_model_len=max_model_len,
        lora_enabled=lora_slots is not None,
        tp=tp,
    )
    return ModelShard(model, lora_slots, runner)
