"""y[t] += scale[s] · (x[t] @ A[s, :r_s]ᵀ) @ B[s, :, :r_s]ᵀ for every token t with slot s = slot(t) ≥ 0.

The torch reference of every op in `loraplex.kernels.sgmv`: the executable spec the Triton kernels
are tested against, and the path that runs on CPU tensors. It loops over the slots present in the
batch (never over tokens), accumulates in float32 and reads each slot's matrices only up to that
slot's own rank.

Layout of one fused LoRA linear with S output slices (q/k/v: S = 3, gate/up: S = 2, o/down: S = 1),
for R = max_rank:
    lora_a  [num_slots, S * R, in_features]   slice i of slot s uses rows i*R : i*R + ranks[s, i]
    lora_b  [num_slots, out_features, R]      slice i writes rows slice_offsets[i] : slice_offsets[i+1]
    ranks   [num_slots, S] int32              0 when the adapter does not target that slice
    scales  [num_slots, S] float32            alpha / r (or alpha / sqrt(r) for rsLoRA)
The shrink result v is [num_tokens, S * R] float32: slice i of token t in columns i*R : i*R + r.
These are logical shapes: the reference indexes, so any strides work (the slot pool's lora_b is
rank-major, a transposed view; `layout.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _present_slots(token_slots: torch.Tensor) -> list[int]:
    # The reference is a spec, not the hot path: reading the slots to the host is acceptable here.
    return [s for s in torch.unique(token_slots).tolist() if s >= 0]


def add_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
) -> None:
    """y[t] += scales[s] * (x[t] @ lora_a[s, :ranks[s]].T) @ lora_b[s, :, :ranks[s]].T, in place.

    :param y: [num_tokens, out_features], updated in place (any float dtype).
    :param x: [num_tokens, in_features].
    :param lora_a: [num_slots, max_rank, in_features].
    :param lora_b: [num_slots, out_features, max_rank], any strides (the pool's is rank-major).
    :param ranks: [num_slots] integer; a slot of rank 0 adds nothing.
    :param scales: [num_slots] float.
    :param token_slots: [num_tokens] integer; -1 means the base model only (y[t] untouched).
    """
    ranks_host = ranks.tolist()
    scales_host = scales.tolist()
    for slot in _present_slots(token_slots):
        rank = int(ranks_host[slot])
        if rank == 0:
            continue
        rows = torch.nonzero(token_slots == slot).flatten()
        a = lora_a[slot, :rank].float()
        b = lora_b[slot, :, :rank].float()
        delta = (x[rows].float() @ a.T) @ b.T * float(scales_host[slot])
        y[rows] = (y[rows].float() + delta).to(y.dtype)


def lora_shrink_reference(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    ranks: torch.Tensor,
    token_slots: torch.Tensor,
) -> torch.Tensor:
    """v[t, i*R : i*R + r] = x[t] @ lora_a[s, i*R : i*R + r].T for each slice i, r = ranks[s, i].

    :param x: [num_tokens, in_features].
    :param lora_a: [num_slots, num_slices * max_rank, in_features].
    :param ranks: [num_slots, num_slices] integer.
    :param token_slots: [num_tokens] integer, -1 = base model only.
    :return: v, [num_tokens, num_slices * max_rank] float32; columns past a slice's rank and rows
        of base-only tokens are zero.
    """
    num_slices = ranks.shape[1]
    max_rank = lora_a.shape[1] // num_slices
    v = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    ranks_host = ranks.tolist()
    for slot in _present_slots(token_slots):
        rows = torch.nonzero(token_slots == slot).flatten()
        xs = x[rows].float()
        for i, rank in enumerate(ranks_host[slot]):
            if rank == 0:
                continue
            cols = slice(i * max_rank, i * max_rank + rank)
            v[rows, cols] = xs @ lora_a[slot, cols].float().T
    return v


def lora_expand_reference(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    slice_offsets: Sequence[int],
    token_slots: torch.Tensor,
) -> None:
    """y[t, o_i : o_{i+1}] += scales[s, i] * v[t, i*R : i*R + r] @ lora_b[s, o_i : o_{i+1}, :r].T.

    :param y: [num_tokens, out_features], updated in place.
    :param v: [num_tokens, num_slices * max_rank] float32, from the shrink.
    :param lora_b: [num_slots, out_features, max_rank], any strides (the pool's is rank-major).
    :param ranks: [num_slots, num_slices] integer.
    :param scales: [num_slots, num_slices] float.
    :param slice_offsets: num_slices + 1 host ints, the output column where each slice starts.
    :param token_slots: [num_tokens] integer, -1 = base model only.
    """
    num_slices = ranks.shape[1]
    max_rank = lora_b.shape[2]
    assert len(slice_offsets) == num_slices + 1, "one offset per slice plus the end"
    ranks_host = ranks.tolist()
    scales_host = scales.tolist()
    for slot in _present_slots(token_slots):
        rows = torch.nonzero(token_slots == slot).flatten()
        for i, rank in enumerate(ranks_host[slot]):
            if rank == 0:
                continue
            out = slice(slice_offsets[i], slice_offsets[i + 1])
            vs = v[rows, i * max_rank : i * max_rank + rank].float()
            delta = (
                vs @ lora_b[slot, out, :rank].float().T * float(scales_host[slot][i])
            )
            y[rows, out] = (y[rows, out].float() + delta).to(y.dtype)
