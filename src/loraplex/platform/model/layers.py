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

from loraplex.kernels import fp8, sgmv

from ..config import RopeSpec
from ..lora_slots import LoraGroupSlots
from .fusions import EAGER, Fusions


class LoraLinear(nn.Module):
    """y = x Wᵀ + b, then y[t, slice_i] += scale_i · (x[t] A_iᵀ) B_iᵀ with token t's own adapter.

    The weight is the concatenation of `out_sizes` slices (q/k/v or gate/up fused at load time).
    With `quantization="fp8"` W is e4m3 with one float32 scale per output row (`weight_scale`
    [out, 1]); x is quantized per token on the fly and the GEMM is the FP8 dispatch table's,
    while the adapter path runs in the activation dtype on the unquantized x.
    `lora` is attached by the engine when LoRA is enabled; `sgmv_backend` picks the SGMV ops.
    """

    def __init__(
        self,
        in_features: int,
        out_sizes: Sequence[int],
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        quantization: str = "none",
    ) -> None:
        super().__init__()
        if quantization not in ("none", "fp8"):
            raise ValueError(f"quantization {quantization!r} is not 'none' or 'fp8'")
        self.in_features = in_features
        self.out_sizes = tuple(out_sizes)
        self.slice_offsets = tuple(
            sum(self.out_sizes[:i]) for i in range(len(self.out_sizes) + 1)
        )
        out_features = self.slice_offsets[-1]
        self.dtype = dtype  # activations, bias, adapters (and W unless quantized)
        self.quantization = quantization
        self.weight = nn.Parameter(
            torch.empty(
                out_features,
                in_features,
                dtype=fp8.FP8_DTYPE if quantization == "fp8" else dtype,
                device=device,
            ),
            requires_grad=False,
        )
        if quantization == "fp8":
            scales = torch.ones(out_features, 1, dtype=torch.float32, device=device)
            self.register_buffer("weight_scale", scales)  # [out, 1] float32
            fp8.reserve_workspace(device)
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
        self.fp8_backend: fp8.Backend = "auto"

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
        if name == "weight" and self.quantization == "fp8":
            # Rows are quantized one by one, so a slice quantizes alone, on the device, from
            # the activation dtype (as a build from the unquantized model does).
            weight = tensor.to(device=param.device, dtype=self.dtype)
            param.data[rows], self.weight_scale[rows] = fp8.quantize_weight(weight)
        else:
            param.data[rows].copy_(tensor)

    def set_weight(self, weight: torch.Tensor) -> None:
        """Fill the whole fused weight [out, in] (quantized if this layer is FP8)."""
        for index in range(len(self.out_sizes)):
            rows = slice(self.slice_offsets[index], self.slice_offsets[index + 1])
            self.load_slice("weight", index, weight[rows])

    @torch.no_grad()
    def quantize_(self) -> None:
        """Turn this layer's weight into e4m3 with per-row scales, in place (the build step)."""
        if self.quantization == "fp8":
            return
        weight_q, scales = fp8.quantize_weight(self.weight.data)
        self.weight = nn.Parameter(weight_q, requires_grad=False)
        self.register_buffer("weight_scale", scales)
        self.quantization = "fp8"
        fp8.reserve_workspace(weight_q.device)

    def forward(
        self, x: torch.Tensor, segments: sgmv.LoraSegments | None
    ) -> torch.Tensor:
        if self.quantization == "fp8":
            y = fp8.fp8_linear(
                x, self.weight, self.weight_scale, self.bias, backend=self.fp8_backend
            )
        else:
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
        self.fusions: Fusions = EAGER

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with a residual, (norm(x + residual), x + residual) in one fusion."""
        if residual is None:
            return self.fusions.rms_norm(x, self.weight, self.eps)
        return self.fusions.add_rms_norm(x, residual, self.weight, self.eps)


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
        self.fusions: Fusions = EAGER

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, H, D] and k [T, KVH, D] by their tokens' positions [T]."""
        return self.fusions.rotary(positions, q, k, self.cos_cache, self.sin_cache)
