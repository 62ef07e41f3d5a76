"""Checkpoint → LlamaForCausalLM: Hugging Face safetensors (one file or sharded), or dummy weights.

q/k/v and gate/up are fused at load time: each checkpoint tensor is routed to a slice of a fused
parameter. Loading is strict: a tensor the model does not know, or one it needs and the
checkpoint lacks, is an error that names it. A model built with `quantization="fp8"` quantizes
each q/k/v, o, gate/up and down tensor on the device as it arrives.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from ..config import ModelSpec
from ..errors import ModelLoadError
from .layers import copy_vocab_rows
from .llama import LlamaForCausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_SLICES = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "self_attn.o_proj": ("self_attn.o_proj", 0),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
    "mlp.down_proj": ("mlp.down_proj", 0),
}
_PLAIN = ("input_layernorm.weight", "post_attention_layernorm.weight")
_QK_NORM = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def expected_tensor_names(spec: ModelSpec) -> set[str]:
    """Every tensor name a checkpoint of this spec must contain."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not spec.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(spec.num_layers):
        prefix = f"model.layers.{i}."
        names.update(prefix + n for n in _PLAIN)
        names.update(prefix + module + ".weight" for module in _SLICES)
        if spec.qkv_bias:
            names.update(prefix + f"self_attn.{p}_proj.bias" for p in "qkv")
        if spec.o_bias:
            names.add(prefix + "self_attn.o_proj.bias")
        if spec.qk_norm:
            names.update(prefix + n for n in _QK_NORM)
    return names


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, from its index when sharded."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelLoadError(f"model directory {root} does not exist")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(
                f"{index} is not a valid safetensors index: {exc}"
            ) from None
        files = [root / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if file.parent != root or not file.is_file():
                raise ModelLoadError(
                    f"{index} names shard {file.name!r}, which is missing"
                )
        return files
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    if any(p.suffix in _PICKLE_SUFFIXES for p in root.iterdir()):
        raise ModelLoadError(
            f"{root} holds only pickle weights (.bin/.pt); loraplex never unpickles. Convert with "
            "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir)"
        )
    raise ModelLoadError(
        f"{root} has no model.safetensors or model.safetensors.index.json"
    )


def _read_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(
                f"{file} is not a readable safetensors file: {exc}"
            ) from None


def _assign(model: LlamaForCausalLM, name: str, tensor: torch.Tensor) -> bool:
    """Copy one checkpoint tensor into its place; False if the model has no place for it."""
    spec = model.spec
    if name == "model.embed_tokens.weight":
        model.embed_tokens.load(tensor)
        return True
    if name == "model.norm.weight":
        return _copy(model.norm.weight, tensor)
    if name == "lm_head.weight":
        if not spec.tie_word_embeddings:
            embed = model.embed_tokens
            copy_vocab_rows(model.lm_head_weight, tensor, embed.rows, spec.vocab_size)
        return True
    match = _LAYER.match(name)
    if not match or int(match.group(1)) >= spec.num_layers:
        return False
    layer = model.layers[int(match.group(1))]
    rest = match.group(2)
    if rest in _PLAIN or (spec.qk_norm and rest in _QK_NORM):
        return _copy(layer.get_parameter(rest), tensor)
    module, _, kind = rest.rpartition(".")
    if module not in _SLICES or kind not in ("weight", "bias"):
        return False
    fused, index = _SLICES[module]
    target = layer.get_submodule(fused)
    if kind == "bias" and target.bias is None:
        return False
    target.load_slice(kind, index, tensor)
    return True


def _copy(param: nn.Parameter, tensor: torch.Tensor) -> bool:
    if param.shape != tensor.shape:
        raise ValueError(
            f"shape {tuple(tensor.shape)} does not match the expected {tuple(param.shape)}"
        )
    param.data.copy_(tensor)
    return True


def load_weights(
    model: LlamaForCausalLM, model_dir: str | Path, progress: bool = False
) -> None:
    """Fill `model` from the checkpoint in `model_dir` (FP8 layers quantize as they load).

    :param progress: a progress bar on stderr, one step per tensor.
    :raises ModelLoadError: unreadable files, unknown or missing tensors, wrong shapes.
    """
    needed = expected_tensor_names(model.spec)
    seen: set[str] = set()
    tensors = _read_tensors(checkpoint_files(model_dir))
    bar = tqdm(tensors, total=len(needed), desc="loading", disable=not progress)
    for name, tensor in bar:
        if _IGNORED.search(name):
            continue
        try:
            known = _assign(model, name, tensor)
        except ValueError as exc:
            raise ModelLoadError(f"checkpoint tensor {name}: {exc}") from None
        if not known:
            raise ModelLoadError(
                f"checkpoint tensor {name} does not belong to a {model.spec.architecture}"
            )
        seen.add(name)
    missing = sorted(needed - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(
            f"checkpoint in {model_dir} lacks tensor {', '.join(missing[:3])}{more}"
        )


def init_dummy_weights(model: LlamaForCausalLM, seed: int = 0) -> None:
    """Random weights of the right shapes (never zeros), for benchmarks: `load_format="dummy"`.

    The numbers are those of a checkpoint drawn tensor by tensor (in name order, on the
    device, in the activation dtype) and loaded the usual way, so that every tensor-parallel
    rank cuts its shard of the same model and FP8 layers quantize as they would from a file.
    """
    spec = model.spec
    param = model.embed_tokens.weight
    for index, name in enumerate(sorted(expected_tensor_names(spec))):
        generator = torch.Generator(device=param.device).manual_seed(seed + index)
        mean = 1.0 if name.endswith("norm.weight") else 0.0
        shape = checkpoint_shape(spec, name)
        tensor = torch.empty(shape, dtype=param.dtype, device=param.device)
        _assign(model, name, tensor.normal_(mean=mean, std=0.02, generator=generator))


def checkpoint_shape(spec: ModelSpec, name: str) -> tuple[int, ...]:
    """The shape tensor `name` has in a Hugging Face checkpoint of this spec."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (spec.vocab_size, spec.hidden_size)
    if name == "model.norm.weight":
        return (spec.hidden_size,)
    rest = _LAYER.match(name).group(2)
    if rest in _PLAIN:
        return (spec.hidden_size,)
    if rest in _QK_NORM:
        return (spec.head_dim,)
    module, _, kind = rest.rpartition(".")
    target = module.rpartition(".")[2].removesuffix("_proj")
    in_features, out_features = spec.lora_shape(target)
    return (out_features, in_features) if kind == "weight" else (out_features,)
