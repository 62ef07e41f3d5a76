"""The building blocks of a Llama-family decoder: LoRA-aware linears, RMSNorm, rotary embedding.

Linears are written the tensor-parallel way (q/k/v and gate/up column-parallel, o and down
row-parallel; see parallel.py): each holds its rank's shard, cut from the checkpoint's tensors as
they load, and a world size of 1 is the whole tensor.
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
from ..parallel import SINGLE, TensorParallel, take_shard
from .fusions import EAGER, Fusions


class LoraLinear(nn.Module):
    """y = x Wᵀ + b, then y[t, slice_i] += scale_i · (x[t] A_iᵀ) B_iᵀ with token t's own adapter.

    The weight is the concatenation of `out_sizes` slices (q/k/v or gate/up fused at load time).
    With `quantization="fp8"` W is e4m3 with one float32 scale per output row (`weight_scale`
    [out, 1]); x is quantized per token on the fly and the GEMM is the FP8 dispatch table's,
    while the adapter path runs in the activation dtype on the unquantized x.
    `lora` is attached by the engine when LoRA is enabled; `sgmv_backend` picks the SGMV ops.
    `shards` gives, per slice, the (rows, columns) of the checkpoint's full tensor that this
    rank keeps (None: all); `in_features` and `out_sizes` are the shard's sizes.
    """

    def __init__(
        self,
        in_features: int,
        out_sizes: Sequence[int],
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        quantization: str = "none",
        shards: Sequence[tuple[slice | None, slice | None]] | None = None,
        full_out_sizes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.shards = tuple(shards or [(None, None)] * len(out_sizes))
        self.full_out_sizes = tuple(full_out_sizes or out_sizes)  # the unsplit slices
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
        shard_rows, shard_columns = self.shards[index]
        rows = slice(self.slice_offsets[index], self.slice_offsets[index + 1])
        if name == "weight" and self.quantization == "fp8":
            # Rows are quantized one by one, so a slice quantizes alone, on the device, from
            # the activation dtype (as a build from the unquantized model does). A row is
            # quantized whole before its columns are cut: a row-parallel shard keeps the full
            # row's scale, so every world size holds the one-GPU engine's weights.
            weight = take_shard(tensor, shard_rows, None)
            self._check_shape(rows, param, take_shard(weight, None, shard_columns))
            weight = weight.to(device=param.device, dtype=self.dtype)
            weight_q, scales = fp8.quantize_weight(weight)
            param.data[rows] = take_shard(weight_q, None, shard_columns)
            self.weight_scale[rows] = scales
        else:
            tensor = take_shard(tensor, shard_rows, shard_columns)
            self._check_shape(rows, param, tensor)
            param.data[rows].copy_(tensor)

    @staticmethod
    def _check_shape(rows: slice, param: torch.Tensor, shard: torch.Tensor) -> None:
        expected = (rows.stop - rows.start, *param.shape[1:])
        if tuple(shard.shape) != expected:
            raise ValueError(
                f"shape {tuple(shard.shape)} does not match the expected {expected}"
            )

    def shard_of_fused(self, kind: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the unsplit fused `weight` [out, in], `weight_scale` [out, 1]
        or `bias` [out] (as a one-GPU engine directory stores them): rows per slice, and the
        input columns of a weight."""
        pieces = full.split(self.full_out_sizes, dim=0)
        parts = [
            take_shard(piece, rows, columns if kind == "weight" else None)
            for piece, (rows, columns) in zip(pieces, self.shards, strict=True)
        ]
        return torch.cat(parts).contiguous()

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
        y = self._base(x, self.bias)
        if self._lora_runs(segments):
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

    def _base(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quantization == "fp8":
            return fp8.fp8_linear(
                x, self.weight, self.weight_scale, bias, backend=self.fp8_backend
            )
        return F.linear(x, self.weight, bias)

    def _lora_runs(self, segments: sgmv.LoraSegments | None) -> bool:
        return self.lora is not None and segments is not None and segments.has_lora


class ColumnParallelLinear(LoraLinear):
    """Output features split across ranks (q/k/v, gate/up); LoRA A replicated, B split by output.

    Each rank computes its own outputs from the whole input: no communication."""


class RowParallelLinear(LoraLinear):
    """Input features split across ranks (o, down); the partial sums are all-reduced.

    LoRA the S-LoRA way: A is split by input, so each rank's shrink is a partial sum too; the
    rank-sized partial v travels in the same all-reduce as the base output (one collective per
    layer, as without LoRA), and every rank then adds the expand of the whole v with the whole
    B. The bias is added once, after the sum.
    """

    def __init__(self, *args, tp: TensorParallel = SINGLE, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tp = tp

    def forward(
        self, x: torch.Tensor, segments: sgmv.LoraSegments | None
    ) -> torch.Tensor:
        if not self.tp.enabled:
            return super().forward(x, segments)
        y = self._base(x, None)  # [T, out] this rank's partial sum
        if not self._lora_runs(segments):
            y = self.tp.all_reduce(y)
        else:
            lora = self.lora
            v = sgmv.lora_shrink(
                x, lora.lora_a, lora.ranks, segments, backend=self.sgmv_backend
            )
            packed = self.tp.all_reduce(torch.cat((y, v.to(y.dtype)), dim=1))
            out = y.shape[1]
            y, v = packed[:, :out], packed[:, out:].float()
            sgmv.lora_expand(
                y,
                v,
                lora.lora_b,
                lora.ranks,
                lora.scales,
                self.slice_offsets,
                segments,
                backend=self.sgmv_backend,
            )
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token ids → embeddings, the vocabulary rows split across ranks.

    Each rank looks up the ids it holds (zeros for the others) and the ranks' rows are summed.
    `weight` [ceil(vocab / world), hidden]: this rank's rows, zero-padded on the last rank.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows, per_rank = tp.vocab_rows(vocab_size)
        self.weight = nn.Parameter(
            torch.zeros(per_rank, hidden_size, dtype=dtype, device=device),
            requires_grad=False,
        )

    def load(self, full: torch.Tensor) -> None:
        """Copy this rank's rows of the full [vocab, hidden] checkpoint tensor."""
        copy_vocab_rows(self.weight, full, self.rows, self.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.enabled:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.rows.start
        outside = (local < 0) | (local >= self.rows.stop - self.rows.start)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill(outside[:, None], 0))


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


def copy_vocab_rows(
    param: torch.Tensor, full: torch.Tensor, rows: slice, vocab_size: int
) -> None:
    """param[: len(rows)] = full[rows] for a vocabulary-parallel [rows, hidden] parameter."""
    expected = (vocab_size, param.shape[1])
    if tuple(full.shape) != expected:
        raise ValueError(
            f"shape {tuple(full.shape)} does not match the expected {expected}"
        )
    shard = full[rows]
    param.data[: shard.shape[0]].copy_(shard)
