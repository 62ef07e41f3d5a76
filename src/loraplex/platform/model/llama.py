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
from .layers import ColumnParallelLinear, RMSNorm, RotaryEmbedding, RowParallelLinear


class Attention(nn.Module):
    def __init__(
        self, spec: ModelSpec, layer: int, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        self.spec = spec
        self.layer = layer
        self.sliding_window = (
            spec.sliding_windows[layer] if spec.sliding_windows else None
        )
        self.scale = spec.head_dim**-0.5
        kv = spec.kv_size
        self.qkv_proj = ColumnParallelLinear(
            spec.hidden_size, (spec.q_size, kv, kv), spec.qkv_bias, dtype, device
        )
        self.o_proj = RowParallelLinear(
            spec.q_size, (spec.hidden_size,), spec.o_bias, dtype, device
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
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device):
        super().__init__()
        inter = spec.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(
            spec.hidden_size, (inter, inter), False, dtype, device
        )
        self.down_proj = RowParallelLinear(
            inter, (spec.hidden_size,), False, dtype, device
        )

    def forward(self, x: torch.Tensor, inputs: ForwardInputs) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, inputs.lora).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, inputs.lora)


class DecoderLayer(nn.Module):
    def __init__(
        self, spec: ModelSpec, layer: int, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(
            spec.hidden_size, spec.rms_norm_eps, dtype, device
        )
        self.self_attn = Attention(spec, layer, dtype, device)
        self.post_attention_layernorm = RMSNorm(
            spec.hidden_size, spec.rms_norm_eps, dtype, device
        )
        self.mlp = MLP(spec, dtype, device)

    def forward(
        self,
        x: torch.Tensor,
        inputs: ForwardInputs,
        rotary: RotaryEmbedding,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), inputs, rotary, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x), inputs)


class LlamaForCausalLM(nn.Module):
    """Token ids, positions, KV cache and adapter slots in; logits at the sampling positions out."""

    def __init__(
        self,
        spec: ModelSpec,
        max_positions: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(
            spec.vocab_size, spec.hidden_size, dtype=dtype, device=device
        )
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, i, dtype, device) for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        self.rotary = RotaryEmbedding(spec.rope, spec.head_dim, max_positions, device)
        if spec.tie_word_embeddings:
            self.lm_head_weight = self.embed_tokens.weight
        else:
            self.lm_head_weight = nn.Parameter(
                torch.empty(
                    spec.vocab_size, spec.hidden_size, dtype=dtype, device=device
                ),
                requires_grad=False,
            )

    @torch.inference_mode()
    def forward(self, inputs: ForwardInputs, kv_cache: KVCache) -> torch.Tensor:
        """Logits [num_sampling, vocab] float32 at `inputs.logits_indices`."""
        x = self.embed_tokens(inputs.input_ids)
        for layer in self.layers:
            x = layer(x, inputs, self.rotary, kv_cache)
        x = self.norm(x[inputs.logits_indices])
        return F.linear(x, self.lm_head_weight).float()

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
