"""PEFT LoRA adapters → LoraWeights, refusing anything loraplex cannot serve exactly.

Validation runs in a fixed order and stops at the first problem, with a message that names the
config field or tensor: config schema, unsupported PEFT features, ranks, tensor names, pairs,
dtypes, shapes against the base model, and finally NaN/Inf.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from loraplex.platform import (
    LORA_TARGETS,
    AdapterShapeError,
    LoraModuleWeights,
    LoraWeights,
    ModelSpec,
)

from .errors import AdapterInvalid

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
CONVERT_HINT = (
    "load it with peft (PeftModel.from_pretrained) and save it again with "
    "save_pretrained(dir, safe_serialization=True)"
)
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\."
    r"(q|k|v|o|gate|up|down)_proj\.lora_(A|B)\.weight$"
)
_MODULE_PARENT = {
    "q": "self_attn",
    "k": "self_attn",
    "v": "self_attn",
    "o": "self_attn",
}
_ALLOWED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")
# (config field, value that means "off", what the feature is called in the message)
_UNSUPPORTED = (
    ("use_dora", False, "DoRA (use_dora)"),
    ("modules_to_save", None, "modules_to_save (fully trained extra modules)"),
    ("lora_bias", False, "lora_bias"),
    ("fan_in_fan_out", False, "fan_in_fan_out (Conv1D-style weights)"),
    ("layer_replication", None, "layer replication"),
    ("trainable_token_indices", None, "trainable token indices (embedding updates)"),
    ("target_parameters", None, "target_parameters (LoRA on parameters)"),
    ("use_qalora", False, "QA-LoRA"),
    ("alora_invocation_tokens", None, "activated LoRA (alora_invocation_tokens)"),
    ("use_bdlora", False, "block-diagonal LoRA"),
    ("megatron_config", None, "Megatron-parallel LoRA"),
)


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT adapter_config.json that decide how the adapter is applied."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: (
        tuple[str, ...] | str
    )  # names, or one regex string ("all-linear" allowed)
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model_name_or_path: str | None

    def rank_for(self, module_path: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_path, self.rank))

    def scale_for(self, module_path: str, rank: int) -> float:
        alpha = float(_pattern_value(self.alpha_pattern, module_path, self.alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module_path: str) -> bool:
        if self.target_modules == "all-linear":
            return True
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_path) is not None
        return any(
            module_path == t or module_path.endswith("." + t)
            for t in self.target_modules
        )


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    # PEFT's rule: the first pattern that matches a dot-bounded suffix of the module path wins.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return default


def parse_adapter_config(raw: bytes | str | dict[str, Any]) -> AdapterConfig:
    """Check adapter_config.json field by field.

    :raises AdapterInvalid: naming the first field that is wrong or unsupported.
    """
    if not isinstance(raw, dict):
        try:
            raw = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AdapterInvalid(f"{ADAPTER_CONFIG} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise AdapterInvalid(f"{ADAPTER_CONFIG} must be a JSON object")
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterInvalid(
            f"peft_type {peft_type!r} is not supported: only LORA", "peft_type"
        )
    for field, off, name in _UNSUPPORTED:
        value = raw.get(field, off)
        if value not in (off, None, False, [], {}):
            raise AdapterInvalid(
                f"{name} is not supported; retrain or merge without it", field
            )
    bias = raw.get("bias", "none")
    if bias != "none":
        raise AdapterInvalid(f"bias={bias!r} is not supported: only 'none'", "bias")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterInvalid(
            f"init_lora_weights={init!r} changes the base weights, which a shared base cannot "
            "serve; convert it to a plain LoRA with PEFT first",
            "init_lora_weights",
        )
    rank = raw.get("r", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterInvalid(f"r must be a positive integer, got {rank!r}", "r")
    alpha = raw.get("lora_alpha", 8)
    if (
        not isinstance(alpha, int | float)
        or isinstance(alpha, bool)
        or not math.isfinite(alpha)
    ):
        raise AdapterInvalid(
            f"lora_alpha must be a number, got {alpha!r}", "lora_alpha"
        )
    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise AdapterInvalid(
            f"use_rslora must be true or false, got {use_rslora!r}", "use_rslora"
        )
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise AdapterInvalid(
                f"target_modules regex is invalid: {exc}", "target_modules"
            ) from None
    elif (
        isinstance(targets, list)
        and targets
        and all(isinstance(t, str) for t in targets)
    ):
        targets = tuple(targets)
    else:
        raise AdapterInvalid(
            "target_modules must be a list of module names or a regex string",
            "target_modules",
        )
    rank_pattern = _pattern_dict(raw, "rank_pattern", int)
    alpha_pattern = _pattern_dict(raw, "alpha_pattern", (int, float))
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(
        rank=rank,
        alpha=float(alpha),
        use_rslora=use_rslora,
        target_modules=targets,
        rank_pattern=rank_pattern,
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        base_model_name_or_path=base if isinstance(base, str) else None,
    )


def _pattern_dict(raw: dict[str, Any], field: str, kind: Any) -> dict[str, Any]:
    value = raw.get(field) or {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool) and v > 0
        for k, v in value.items()
    ):
        raise AdapterInvalid(
            f"{field} must map module patterns to positive numbers", field
        )
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise AdapterInvalid(
                f"{field} key {pattern!r} is not a valid regex: {exc}", field
            ) from None
    return value


def build_lora_weights(
    config: AdapterConfig,
    tensors: dict[str, torch.Tensor],
    spec: ModelSpec,
    max_lora_rank: int,
) -> LoraWeights:
    """Pair lora_A/lora_B tensors per (layer, module) and check them against the base model.

    :raises AdapterInvalid: naming the first tensor that is unknown, unpaired or does not fit.
    """
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name in sorted(tensors):
        match = _KEY.match(name)
        if match is None:
            raise AdapterInvalid(_unknown_key_message(name), name)
        layer, parent, target, which = (
            int(match.group(1)),
            match.group(2),
            match.group(3),
            match.group(4),
        )
        if _MODULE_PARENT.get(target, "mlp") != parent:
            raise AdapterInvalid(
                f"tensor {name}: {target}_proj does not live under {parent}", name
            )
        tensor = tensors[name]
        if tensor.dtype not in _ALLOWED_DTYPES:
            raise AdapterInvalid(
                f"tensor {name} has dtype {tensor.dtype}; use float16, bfloat16 or float32",
                name,
            )
        if tensor.dim() != 2:
            raise AdapterInvalid(
                f"tensor {name} must be 2-D, got shape {tuple(tensor.shape)}", name
            )
        pairs.setdefault((layer, target), {})[which] = tensor
    if not pairs:
        raise AdapterInvalid(f"{ADAPTER_WEIGHTS} holds no LoRA tensors")
    modules = {}
    for (layer, target), pair in sorted(pairs.items()):
        path = f"model.layers.{layer}.{_MODULE_PARENT.get(target, 'mlp')}.{target}_proj"
        for which in "AB":
            if which not in pair:
                raise AdapterInvalid(
                    f"{path}.lora_{which}.weight is missing (its pair is present)"
                )
        if not config.targets(path):
            raise AdapterInvalid(
                f"{path} has LoRA tensors but target_modules does not name it",
                "target_modules",
            )
        rank = pair["A"].shape[0]
        expected = config.rank_for(path)
        if rank != expected:
            raise AdapterInvalid(
                f"{path}.lora_A.weight has rank {rank}, but the config says {expected}",
                path,
            )
        modules[(layer, target)] = LoraModuleWeights(
            pair["A"], pair["B"], config.scale_for(path, rank)
        )
    weights = LoraWeights(modules)
    try:
        weights.check_fits(spec, max_lora_rank)
    except AdapterShapeError as exc:
        raise AdapterInvalid(f"adapter does not fit the base model: {exc}") from None
    for (layer, target), module in sorted(modules.items()):
        for which, tensor in (("A", module.lora_a), ("B", module.lora_b)):
            if not torch.isfinite(tensor).all():
                raise AdapterInvalid(
                    f"layer {layer} {target}_proj lora_{which} contains NaN or Inf"
                )
    return weights


def _unknown_key_message(name: str) -> str:
    if "lora_embedding" in name or "embed_tokens" in name:
        return f"tensor {name}: LoRA on embeddings is not supported"
    if "lm_head" in name:
        return f"tensor {name}: LoRA on lm_head is not supported"
    if "magnitude" in name:
        return f"tensor {name}: DoRA is not supported"
    targets = ", ".join(f"{t}_proj" for t in LORA_TARGETS)
    return (
        f"tensor {name} is not a LoRA weight of a Llama-family decoder layer "
        f"(expected base_model.model.model.layers.N.<module>.lora_A|lora_B.weight, module one of {targets})"
    )


def load_adapter_dir(
    path: str | Path, spec: ModelSpec, max_lora_rank: int
) -> LoraWeights:
    """Load and validate a PEFT adapter directory chosen by an operator (never by a request).

    :raises AdapterInvalid: missing files, pickle weights, or any validation failure.
    """
    root = Path(path)
    if not root.is_dir():
        raise AdapterInvalid(f"adapter directory {root} does not exist")
    config_file, weights_file = root / ADAPTER_CONFIG, root / ADAPTER_WEIGHTS
    if not weights_file.is_file() and any(
        (root / name).is_file() for name in PICKLE_WEIGHTS
    ):
        raise AdapterInvalid(
            f"{root} holds pickle weights, which loraplex never loads; {CONVERT_HINT}"
        )
    for file in (config_file, weights_file):
        if not file.is_file():
            raise AdapterInvalid(
                f"{file} is missing: an adapter is {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}"
            )
    config = parse_adapter_config(config_file.read_bytes())
    try:
        with safe_open(str(weights_file), framework="pt", device="cpu") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterInvalid(
            f"{ADAPTER_WEIGHTS} is not a valid safetensors file: {exc}"
        ) from None
    return build_lora_weights(config, tensors, spec, max_lora_rank)
