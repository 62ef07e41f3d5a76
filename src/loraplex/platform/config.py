"""EngineConfig (what the operator chose) and ModelSpec (what the checkpoint's config.json says)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import ModelLoadError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters; `rope_type` is one of SUPPORTED_ROPE_TYPES."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelSpec:
    """The shapes and options of a Llama-family checkpoint, read from its config.json."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple[int | None, ...] = ()  # one per layer; None = full attention
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str = "float32"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def lora_shape(self, target: str) -> tuple[int, int]:
        """(in_features, out_features) of the linear a LoRA target module adapts."""
        shapes = {
            "q": (self.hidden_size, self.q_size),
            "k": (self.hidden_size, self.kv_size),
            "v": (self.hidden_size, self.kv_size),
            "o": (self.q_size, self.hidden_size),
            "gate": (self.hidden_size, self.intermediate_size),
            "up": (self.hidden_size, self.intermediate_size),
            "down": (self.intermediate_size, self.hidden_size),
        }
        return shapes[target]

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelSpec:
        """Read `config.json` of a Hugging Face checkpoint directory.

        :raises ModelLoadError: missing or invalid config, or an unsupported architecture.
        """
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelLoadError(
                f"{path} not found: a model directory needs config.json"
            ) from None
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path} must hold a JSON object")
        return cls.from_config(raw, source=str(path))

    @classmethod
    def from_config(cls, raw: dict[str, Any], source: str = "config.json") -> ModelSpec:
        """Build a spec from a parsed config.json (transformers 4.x or 5.x layout)."""
        architecture = _architecture(raw, source)
        model_type = SUPPORTED_ARCHITECTURES[architecture]

        def need(key: str) -> Any:
            if key not in raw or raw[key] is None:
                raise ModelLoadError(f"{source}: missing required field {key!r}")
            return raw[key]

        if raw.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(
                f"{source}: hidden_act {raw['hidden_act']!r} unsupported (silu only)"
            )
        if raw.get("mlp_bias"):
            raise ModelLoadError(f"{source}: mlp_bias=true is not supported")
        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        num_layers = int(need("num_hidden_layers"))
        num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ModelLoadError(
                f"{source}: num_attention_heads ({num_heads}) is not a multiple of "
                f"num_key_value_heads ({num_kv_heads})"
            )
        attention_bias = bool(raw.get("attention_bias", False))
        eos = raw.get("eos_token_id")
        eos_ids = (
            tuple(eos)
            if isinstance(eos, list)
            else (() if eos is None else (int(eos),))
        )
        return cls(
            architecture=architecture,
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_rope(raw, source),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            qk_norm=model_type == "qwen3",
            sliding_windows=_sliding_windows(raw, model_type, num_layers),
            eos_token_ids=eos_ids,
            checkpoint_dtype=str(
                raw.get("dtype") or raw.get("torch_dtype") or "float32"
            ),
        )


def _architecture(raw: dict[str, Any], source: str) -> str:
    architectures = raw.get("architectures") or []
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
    if not architectures and raw.get("model_type") in by_type:
        return by_type[raw["model_type"]]
    found = ", ".join(architectures) or f"model_type {raw.get('model_type')!r}"
    raise ModelLoadError(
        f"{source}: unsupported architecture {found}; loraplex supports "
        + ", ".join(SUPPORTED_ARCHITECTURES)
    )


def _rope(raw: dict[str, Any], source: str) -> RopeSpec:
    # transformers 5 writes `rope_parameters` (theta inside); 4.x wrote `rope_theta` + `rope_scaling`.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{source}: rope type {rope_type!r} is not supported (supported: "
            + ", ".join(SUPPORTED_ROPE_TYPES)
            + ")"
        )
    if (
        float(
            params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
        )
        != 1.0
    ):
        raise ModelLoadError(f"{source}: partial_rotary_factor != 1 is not supported")
    return RopeSpec(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get(
                "original_max_position_embeddings",
                raw.get("max_position_embeddings", 8192),
            )
        ),
    )


def _sliding_windows(
    raw: dict[str, Any], model_type: str, num_layers: int
) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if model_type in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
        window = None
    if window is None:
        return (None,) * num_layers
    if layer_types:
        return tuple(
            int(window) if t == "sliding_attention" else None for t in layer_types
        )
    if model_type in ("qwen2", "qwen3"):
        first = int(raw.get("max_window_layers", num_layers))
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    return (int(window),) * num_layers


DType = Literal["auto", "float32", "float16", "bfloat16"]


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start, fixed for its lifetime.

    :param model: a Hugging Face checkpoint directory, or an engine directory written by
        `loraplex build` (its engine.json then fixes quantization, dtype and the limits).
    :param dtype: activation and weight dtype; "auto" takes the checkpoint's.
    :param device: "cpu", "cuda", "cuda:N" or "auto" (CUDA when present).
    :param max_num_seqs: requests in one batch at most.
    :param max_num_batched_tokens: the per-step token budget shared by prefill chunks and decodes.
    :param max_model_len: prompt plus generated tokens of one request at most; 0 = the model's limit.
    :param block_size: tokens per KV-cache block.
    :param num_kv_blocks: KV-cache blocks; 0 = enough for max_num_seqs full-length requests.
    :param max_loras: adapter slots resident in the engine (0 disables LoRA).
    :param max_lora_rank: the largest adapter rank a slot holds.
    :param lora_backend: "auto", "torch" or "triton" for the SGMV ops.
    :param load_format: "auto" reads safetensors; "dummy" makes random weights of the right shapes.
    :param quantization: "none", or "fp8": q/k/v, o, gate/up and down weights in e4m3 with
        per-output-channel scales, activations quantized per token (quantized at load from a
        checkpoint; an engine directory holds them quantized already).
    :param seed: seeds requests that carry no seed of their own.
    :param enable_prefix_caching: reuse the KV blocks of a prompt's cached prefix (same engine,
        adapter content and salt only; see prefix_cache.py).
    :param enforce_eager: no CUDA graphs and no torch.compile (debugging, first-token latency).
    :param mixed_graph_max_tokens: steps that carry prompt chunks, of up to this many tokens
        (capped by max_num_batched_tokens), replay CUDA graphs captured for token buckets rather
        than launching every kernel from Python; 0: they run eagerly. None (the default): 4096
        on one GPU, where an eager step of 575 tokens took 112 ms of host time against 10.4 ms
        replayed (H200, bench_engine, 2026-11-27), and 0 under tensor parallelism, where these
        graphs are not yet measured (mixed_graphs.py).
    :param gpu_memory_utilization: the share of the GPU's memory the engine may fill, KV cache
        included; the KV cache gets what weights, adapter slots and activations leave.
    :param tensor_parallel_size: ranks the model is split over, one process (and GPU) each;
        rank 0 runs in this process and the others in worker processes (see parallel.py).
    """

    model: str
    dtype: DType = "auto"
    device: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 0
    block_size: int = 16
    num_kv_blocks: int = 0
    max_loras: int = 8
    max_lora_rank: int = 64
    lora_backend: Literal["auto", "torch", "triton"] = "auto"
    load_format: Literal["auto", "dummy"] = "auto"
    quantization: Literal["none", "fp8"] = "none"
    seed: int = 0
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    mixed_graph_max_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        checks = {
            "max_num_seqs": self.max_num_seqs >= 1,
            "max_num_batched_tokens": self.max_num_batched_tokens >= 1,
            "max_model_len": self.max_model_len >= 0,
            "block_size": self.block_size >= 1,
            "num_kv_blocks": self.num_kv_blocks >= 0,
            "max_loras": self.max_loras >= 0,
            "max_lora_rank": self.max_lora_rank >= 1,
            "gpu_memory_utilization": 0 < self.gpu_memory_utilization <= 1,
            "tensor_parallel_size": self.tensor_parallel_size >= 1,
            "mixed_graph_max_tokens": (self.mixed_graph_max_tokens or 0) >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"EngineConfig.{name} = {getattr(self, name)!r} is out of range"
                )
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(
                f"EngineConfig.dtype {self.dtype!r} is not auto/float32/float16/bfloat16"
            )
        if self.quantization not in ("none", "fp8"):
            raise ValueError(
                f"EngineConfig.quantization {self.quantization!r} is not none/fp8"
            )

    @property
    def mixed_graph_tokens(self) -> int:
        """mixed_graph_max_tokens with its default resolved and the step budget applied."""
        wanted = self.mixed_graph_max_tokens
        if wanted is None:
            wanted = DEFAULT_MIXED_GRAPH_TOKENS if self.tensor_parallel_size == 1 else 0
        return min(wanted, self.max_num_batched_tokens)


DEFAULT_MIXED_GRAPH_TOKENS = 4096


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks needed to hold `num_tokens` tokens."""
    return math.ceil(num_tokens / block_size)
