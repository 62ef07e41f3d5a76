"""The Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, Qwen3) over a flat batch of tokens.

One forward pass takes the tokens of many sequences laid end to end (no padding), their
positions, the paged KV cache and each token's adapter slot, and returns hidden states; logits
are computed only at the positions that sample. Differences between the families are flags of
ModelSpec: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), sliding windows (Mistral), tied
embeddings, Llama-3 rope scaling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import paged_attention
from ..config import ModelSpec
from ..inputs import ForwardInputs
from ..kv_cache import KVCache
from ..parallel import SINGLE, TensorParallel, shard_spec
from .fusions import EAGER, Fusions
from .layers import (
    ColumnParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)


class Attention(nn.Module):
    """Self-attention over this rank's query and KV heads (`spec`: the whole model's sizes)."""

    def __init__(
        self,
        spec: ModelSpec,
        layer: int,
        dtype: torch.dtype,
        device: torch.device,
        quantization: str = "none",
        tp: TensorParallel = SINGLE,
    ):
        super().__init__()
        self.spec = local = shard_spec(spec, tp)
        self.layer = layer
        self.sliding_window = (
            spec.sliding_windows[layer] if spec.sliding_windows else None
        )
        self.scale = spec.head_dim**-0.5
        kv = local.kv_size
        self.qkv_proj = ColumnParallelLinear(
            spec.hidden_size,
            (local.q_size, kv, kv),
            spec.qkv_bias,
            dtype,
            device,
            quantization,
            shards=[tp.weight_shard(spec, t) for t in "qkv"],
            full_out_sizes=(spec.q_size, spec.kv_size, spec.kv_size),
        )
        self.o_proj = RowParallelLinear(
            local.q_size,
            (spec.hidden_size,),
            spec.o_bias,
            dtype,
            device,
            quantization,
            shards=[tp.weight_shard(spec, "o")],
            tp=tp,
        )
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype, device)

    def forward(
        self,
        x: torch.Tensor,
        inputs: ForwardInputs,
        rotary: RotaryEmbedding,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        spec = self.spec
        qkv = self.qkv_proj(x, inputs.lora)
        q, k, v = qkv.split((spec.q_size, spec.kv_size, spec.kv_size), dim=-1)
        q = q.reshape(-1, spec.num_heads, spec.head_dim)
        k = k.reshape(-1, spec.num_kv_heads, spec.head_dim)
        v = v.reshape(-1, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(inputs.positions, q, k)
        out = paged_attention(
            q, k, v, kv_cache.layer(self.layer), inputs, self.scale, self.sliding_window
        )
        return self.o_proj(out.reshape(-1, spec.q_size), inputs.lora)


class MLP(nn.Module):
    """gate/up, SiLU · mul, down over this rank's share of the intermediate features."""

    def __init__(
        self,
        spec: ModelSpec,
        dtype: torch.dtype,
        device: torch.device,
        quantization: str = "none",
        tp: TensorParallel = SINGLE,
    ):
        super().__init__()
        inter = shard_spec(spec, tp).intermediate_size
        self.gate_up_proj = ColumnParallelLinear(
            spec.hidden_size,
            (inter, inter),
            False,
            dtype,
            device,
            quantization,
            shards=[tp.weight_shard(spec, t) for t in ("gate", "up")],
            full_out_sizes=(spec.intermediate_size, spec.intermediate_size),
        )
        self.down_proj = RowParallelLinear(
            inter,
            (spec.hidden_size,),
            False,
            dtype,
            device,
            quantization,
            shards=[tp.weight_shard(spec, "down")],
            tp=tp,
        )
        self.fusions: Fusions = EAGER

    def forward(self, x: torch.Tensor, inputs: ForwardInputs) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, inputs.lora)
        return self.down_proj(self.fusions.silu_and_mul(gate_up), inputs.lora)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        layer: int,
        dtype: torch.dtype,
        device: torch.device,
        quantization: str = "none",
        tp: TensorParallel = SINGLE,
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(
            spec.hidden_size, spec.rms_norm_eps, dtype, device
        )
        self.self_attn = Attention(spec, layer, dtype, device, quantization, tp)
        self.post_attention_layernorm = RMSNorm(
            spec.hidden_size, spec.rms_norm_eps, dtype, device
        )
        self.mlp = MLP(spec, dtype, device, quantization, tp)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        inputs: ForwardInputs,
        rotary: RotaryEmbedding,
        kv_cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it); their sum is the layer's
        output, added inside the next norm so that the add and the norm are one fusion."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, inputs, rotary, kv_cache)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h, inputs), residual


class LlamaForCausalLM(nn.Module):
    """Token ids, positions, KV cache and adapter slots in; logits at the sampling positions out.

    `quantization="fp8"` stores the weights of q/k/v, o, gate/up and down in e4m3 (see
    LoraLinear); embeddings, norms and the LM head stay in `dtype`. With `tp` of several ranks
    this is one rank's shard (parallel.py); `spec` stays the whole model's.
    """

    def __init__(
        self,
        spec: ModelSpec,
        max_positions: int,
        dtype: torch.dtype,
        device: torch.device,
        quantization: str = "none",
        tp: TensorParallel = SINGLE,
    ):
        super().__init__()
        self.spec = spec
        self.tp = tp
        self.embed_tokens = VocabParallelEmbedding(
            spec.vocab_size, spec.hidden_size, dtype, device, tp
        )
        self.layers = nn.ModuleList(
            DecoderLayer(spec, i, dtype, device, quantization, tp)
            for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        self.rotary = RotaryEmbedding(spec.rope, spec.head_dim, max_positions, device)
        if spec.tie_word_embeddings:
            self.lm_head_weight = self.embed_tokens.weight
        else:
            rows = self.embed_tokens.weight.shape[0]  # this rank's, padded
            self.lm_head_weight = nn.Parameter(
                torch.zeros(rows, spec.hidden_size, dtype=dtype, device=device),
                requires_grad=False,
            )

    @torch.inference_mode()
    def forward(self, inputs: ForwardInputs, kv_cache: KVCache) -> torch.Tensor:
        """Logits [num_sampling, vocab] float32 at `inputs.logits_indices`."""
        x, residual = self.embed_tokens(inputs.input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, inputs, self.rotary, kv_cache)
        rows = inputs.logits_indices
        x, _ = self.norm(x[rows], residual[rows])
        logits = self.tp.all_gather_columns(F.linear(x, self.lm_head_weight))
        return logits[:, : self.spec.vocab_size].float()

    def shard_of(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of tensor `name` of the unsplit model (as `state_dict` names it:
        an engine directory built on one GPU)."""
        if not self.tp.enabled:
            return full
        if name in ("embed_tokens.weight", "lm_head_weight"):
            rows, per_rank = self.tp.vocab_rows(self.spec.vocab_size)
            shard = full.new_zeros((per_rank, *full.shape[1:]))
            shard[: rows.stop - rows.start] = full[rows]
            return shard
        module_name, _, kind = name.rpartition(".")
        module = self.get_submodule(module_name)
        if isinstance(module, ColumnParallelLinear | RowParallelLinear):
            return module.shard_of_fused(kind, full)
        return full

    def use_fusions(self, fusions: Fusions) -> None:
        """Route every norm, rotary and activation of the model through `fusions`."""
        for module in self.modules():
            if hasattr(module, "fusions"):
                module.fusions = fusions

    def lora_linears(self) -> list[dict[str, ColumnParallelLinear | RowParallelLinear]]:
        """Per layer, the LoRA-capable linears by group name (qkv, o, gate_up, down)."""
        return [
            {
                "qkv": layer.self_attn.qkv_proj,
                "o": layer.self_attn.o_proj,
                "gate_up": layer.mlp.gate_up_proj,
                "down": layer.mlp.down_proj,
            }
            for layer in self.layers
        ]
