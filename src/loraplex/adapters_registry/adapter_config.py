"""AdapterConfig: a PEFT adapter_config.json checked field by field.

The checks run in a fixed order and stop at the first problem: JSON and schema types, then each
unsupported PEFT feature by name, then ranks (r and every rank_pattern value) against
max_lora_rank.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import AdapterInvalid

ADAPTER_CONFIG = "adapter_config.json"
MAX_CONFIG_BYTES = 64 * 1024
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
    ("arrow_config", None, "Arrow routing (arrow_config)"),
    (
        "lora_ga_config",
        None,
        "LoRA-GA, which changes the base weights (lora_ga_config)",
    ),
    ("kasa_config", None, "KaSA (kasa_config)"),
    ("monteclora_config", None, "MonteCLoRA (monteclora_config)"),
    ("velora_config", None, "VeLoRA (velora_config)"),
)


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT adapter_config.json that decide how the adapter is applied."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str  # names, or a regex string ("all-linear")
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model_name_or_path: str | None

    def rank_for(self, module_path: str) -> int:
        """The rank PEFT gives `module_path` (rank_pattern first, then r)."""
        return int(_pattern_value(self.rank_pattern, module_path, self.rank))

    def scale_for(self, module_path: str, rank: int) -> float:
        """alpha / rank, or alpha / sqrt(rank) with rsLoRA, alpha from alpha_pattern first."""
        alpha = float(_pattern_value(self.alpha_pattern, module_path, self.alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module_path: str) -> bool:
        """Whether target_modules names `module_path`."""
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


def parse_adapter_config(
    raw: bytes | str | dict[str, Any], max_lora_rank: int | None = None
) -> AdapterConfig:
    """Check adapter_config.json: types, then unsupported features, then ranks.

    :param max_lora_rank: when given, r and every rank_pattern value must be at most this.
    :raises AdapterInvalid: naming the first field that is wrong or unsupported.
    """
    if not isinstance(raw, dict):
        if len(raw) > MAX_CONFIG_BYTES:
            raise AdapterInvalid(
                f"{ADAPTER_CONFIG} is {len(raw)} bytes, over the {MAX_CONFIG_BYTES}-byte cap",
                ADAPTER_CONFIG,
            )
        try:
            raw = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise AdapterInvalid(
                f"{ADAPTER_CONFIG} is not valid JSON: {exc}", ADAPTER_CONFIG
            ) from None
    if not isinstance(raw, dict):
        raise AdapterInvalid(f"{ADAPTER_CONFIG} must be a JSON object", ADAPTER_CONFIG)
    config = _typed(raw)
    _refuse_unsupported(raw)
    if max_lora_rank is not None:
        _check_ranks(config, max_lora_rank)
    return config


def _typed(raw: dict[str, Any]) -> AdapterConfig:
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterInvalid(
            f"peft_type {peft_type!r} is not supported: only LORA", "peft_type"
        )
    rank = raw.get("r", 8)
    if not _is_int(rank) or rank < 1:
        raise AdapterInvalid(f"r must be a positive integer, got {rank!r}", "r")
    alpha = raw.get("lora_alpha", 8)
    if not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterInvalid(
            f"lora_alpha must be a positive number, got {alpha!r}", "lora_alpha"
        )
    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise AdapterInvalid(
            f"use_rslora must be true or false, got {use_rslora!r}", "use_rslora"
        )
    bias = raw.get("bias", "none")
    if not isinstance(bias, str):
        raise AdapterInvalid(f"bias must be a string, got {bias!r}", "bias")
    init = raw.get("init_lora_weights", True)
    if not isinstance(init, bool | str):
        raise AdapterInvalid(
            f"init_lora_weights must be true, false or a string, got {init!r}",
            "init_lora_weights",
        )
    base = raw.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterInvalid(
            f"base_model_name_or_path must be a string, got {base!r}",
            "base_model_name_or_path",
        )
    return AdapterConfig(
        rank=rank,
        alpha=float(alpha),
        use_rslora=use_rslora,
        target_modules=_targets(raw.get("target_modules")),
        rank_pattern=_pattern_dict(raw, "rank_pattern", _is_int),
        alpha_pattern={
            k: float(v)
            for k, v in _pattern_dict(raw, "alpha_pattern", _is_number).items()
        },
        base_model_name_or_path=base,
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _targets(targets: object) -> tuple[str, ...] | str:
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise AdapterInvalid(
                f"target_modules regex is invalid: {exc}", "target_modules"
            ) from None
        return targets
    if (
        isinstance(targets, list)
        and targets
        and all(isinstance(t, str) for t in targets)
    ):
        return tuple(targets)
    raise AdapterInvalid(
        "target_modules must be a list of module names or a regex string",
        "target_modules",
    )


def _pattern_dict(raw: dict[str, Any], field: str, kind: Any) -> dict[str, Any]:
    value = raw.get(field) or {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and kind(v) and math.isfinite(v) and v > 0
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


def _refuse_unsupported(raw: dict[str, Any]) -> None:
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


def _check_ranks(config: AdapterConfig, max_lora_rank: int) -> None:
    if config.rank > max_lora_rank:
        raise AdapterInvalid(
            f"r: rank {config.rank} exceeds max_lora_rank {max_lora_rank}", "r"
        )
    for pattern, rank in config.rank_pattern.items():
        if rank > max_lora_rank:
            raise AdapterInvalid(
                f"rank_pattern[{pattern!r}]: rank {rank} exceeds max_lora_rank "
                f"{max_lora_rank}",
                "rank_pattern",
            )
