"""The building blocks of a Llama-family decoder: LoRA-aware linears, RMSNorm, rotary embedding.

Linears are written the tensor-parallel way (q/k/v and gate/up column-parallel, o and down
row-parallel) with a world size of 1, so that sharding later changes sizes, not code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.kernels import sgmv

from ..config import RopeSpec
from ..lora_slots import LoraGroupSlots


class LoraLinear(nn.Module):
    """y = x Wᵀ + b, then y[t, slice_i] += scale_i · (x[t] A_iᵀ) B_iᵀ with token t's own adapter.

    The weight is the concatenation of `out_sizes` slices (q/k/v or gate/up fused at load time).
    `lora` is attached by the engine when LoRA is enabled; `sgmv_backend` picks the SGMV ops.
    """

    def __init__(
        self,
        in_features: int,
        out_sizes: Sequence[int],
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_sizes = tuple(out_sizes)
        self.slice_offsets = tuple(
            sum(self.out_sizes[:i]) for i in range(len(self.out_sizes) + 1)
        )
        out_features = self.slice_offsets[-1]
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.bias = (
            nn.Parameter(
                torch.empty(out_features, dtype=dtype, device=device),
                requires_grad=False,
            )
            if bias
            else None
        )
        self.lora: LoraGroupSlots | None = None
        self.sgmv_backend: sgmv.Backend = "auto"

    def load_slice(self, name: str, index: int, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor (weight or bias of slice `index`) into the fused parameter."""
        param = self.weight if name == "weight" else self.bias
        if param is None:
            raise ValueError("this layer has no bias")
        rows = slice(self.slice_offsets[index], self.slice_offsets[index + 1])
        expected = (rows.stop - rows.start, *param.shape[1:])
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"shape {tuple(tensor.shape)} does not match the expected {expected}"
            )
        param.data[rows].copy_(tensor)

    def forward(
        self, x: torch.Tensor, segments: sgmv.LoraSegments | None
    ) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.lora is not None and segments is not None and segments.has_lora:
            lora = self.lora
            sgmv.lora_linear(
                y,
                x,
                lora.lora_a,
                lora.lora_b,
                lora.ranks,
                lora.scales,
                self.slice_offsets,
                segments,
                backend=self.sgmv_backend,
            )
        return y


class ColumnParallelLinear(LoraLinear):
    """Output features split across ranks (q/k/v, gate/up); LoRA A replicated, B split by output."""


class RowParallelLinear(LoraLinear):
    """Input features split across ranks (o, down); LoRA A split by input, B replicated."""


class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), computed in float32 as transformers does."""

    def __init__(
        self, size: int, eps: float, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(size, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] float32, with linear or Llama-3 scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (the half-split layout of transformers' rotate_half)."""

    def __init__(
        self, rope: RopeSpec, head_dim: int, max_positions: int, device: torch.device
    ):
        super().__init__()
        inv_freq = rope_inv_freq(rope, head_dim)
        freqs = (
            torch.arange(max_positions, dtype=torch.float32)[:, None]
            * inv_freq[None, :]
        )
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer(
            "cos_cache", emb.cos().to(device), persistent=False
        )  # [pos, head_dim]
        self.register_buffer("sin_cache", emb.sin().to(device), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, H, D] and k [T, KVH, D] by their tokens' positions [T]."""
        cos = self.cos_cache[positions].to(q.dtype)[:, None, :]
        sin = self.sin_cache[positions].to(q.dtype)[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
