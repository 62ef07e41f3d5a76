"""Multi-LoRA matmuls over a batch whose tokens use different adapter slots (SGMV).

Public ops:
- `add_lora(y, x, lora_a, lora_b, ranks, scales, token_slots)`: the functional form, one slice.
- `lora_linear(y, x, lora_a, lora_b, ranks, scales, slice_offsets, segments)`: one whole
  (possibly fused q/k/v or gate/up) LoRA linear: a shrink and an expand launch.
- `lora_shrink` / `lora_expand`: the two halves, for callers that keep v.
Segment metadata is built once per step by `build_segments` (or `LoraSegmentBuffers` for graphs).
`new_lora_b` allocates a slot pool's B: the logical [slots, out, R] over rank-major storage, so
that a low-rank adapter in a high-rank pool reads only its own bytes (`layout.py`); the ops also
take out-major B.

`backend="auto"` runs Triton on CUDA tensors and the torch reference on CPU tensors; `"torch"`
forces the reference; `"triton"` forces the kernels (on CPU tensors in Triton's interpreter, as
`TRITON_INTERPRET=1` would run them). Nothing falls back silently from one backend to another.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from .layout import new_lora_b, rank_major
from .reference import add_lora_reference, lora_expand_reference, lora_shrink_reference
from .segments import (
    LoraSegmentBuffers,
    LoraSegments,
    build_segments,
    segments_from_slot_tensor,
)

Backend = Literal["auto", "torch", "triton"]
LinearPath = Literal["auto", "fused", "split"]

# `lora_linear(path="fused")` runs shrink and expand in one kernel (v in registers, one launch).
# On an H100 (2026-11-27) it lost to the split pair on every decode shape measured, by 1.3x at
# one token (a fused program streams its slot's whole A without split-K) up to 6x at 256
# tokens (every output block re-reads A), so "auto" takes the split path.

__all__ = [
    "Backend",
    "LoraSegmentBuffers",
    "LoraSegments",
    "add_lora",
    "build_segments",
    "lora_expand",
    "lora_linear",
    "lora_shrink",
    "new_lora_b",
    "rank_major",
    "resolve_backend",
]


def resolve_backend(
    backend: Backend, tensor: torch.Tensor
) -> Literal["torch", "triton"]:
    """The backend that will run for `backend` on tensors living where `tensor` lives."""
    if backend == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(
            f"unknown SGMV backend {backend!r}; expected 'auto', 'torch' or 'triton'"
        )
    return backend


def _triton_ops():
    """The kernel modules, imported on first use: triton exists only on Linux x86-64 hosts."""
    from . import expand, shrink

    return shrink, expand


def lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    slice_offsets: Sequence[int],
    segments: LoraSegments,
    *,
    backend: Backend = "auto",
    path: LinearPath = "auto",
) -> None:
    """y[t, o_i : o_{i+1}] += scales[s, i] * (x[t] @ A_i[s, :r].T) @ B[s, o_i : o_{i+1}, :r].T.

    One LoRA linear of S slices (layout of `lora_shrink` and `lora_expand`), in place.

    :param path: "split" (shrink then expand; what "auto" picks) or "fused" (one kernel, v kept
        in registers; slower as measured, kept for the record and for later work). Triton only.
    """
    if resolve_backend(backend, x) == "torch":
        v = lora_shrink_reference(x, lora_a, ranks, segments.token_slots)
        lora_expand_reference(
            y, v, lora_b, ranks, scales, slice_offsets, segments.token_slots
        )
        return
    shrink, expand = _triton_ops()
    from . import fused

    if path == "auto":
        path = "split"  # the fused kernel measured slower on every decode shape (see above)
    if path == "fused":
        shrink.check_shrink_inputs(x, lora_a, ranks, segments)
        expand.check_expand_inputs(
            y, None, lora_b, ranks, scales, slice_offsets, segments
        )
        if (
            x.shape[0] != y.shape[0]
            or lora_a.shape[1] != ranks.shape[1] * lora_b.shape[2]
        ):
            raise ValueError("x and y, or lora_a and lora_b, disagree in shape")
        fused.sgmv_fused(y, x, lora_a, lora_b, ranks, scales, slice_offsets, segments)
    elif path == "split":
        v = shrink.sgmv_shrink(x, lora_a, ranks, segments)
        expand.sgmv_expand(y, v, lora_b, ranks, scales, slice_offsets, segments)
    else:
        raise ValueError(f"unknown path {path!r}; expected 'auto', 'fused' or 'split'")


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> None:
    """y[t] += scales[s] * (x[t] @ lora_a[s, :ranks[s]].T) @ lora_b[s, :, :ranks[s]].T, in place.

    For every token t whose slot s = token_slots[t] is >= 0; tokens with slot -1 are untouched.

    :param y: [num_tokens, out_features] float, updated in place.
    :param x: [num_tokens, in_features] float.
    :param lora_a: [num_slots, max_rank, in_features].
    :param lora_b: [num_slots, out_features, max_rank], out-major or rank-major (`new_lora_b`).
    :param ranks: [num_slots] int32, each slot's own rank (<= max_rank).
    :param scales: [num_slots] float32.
    :param token_slots: [num_tokens] int32.
    :param backend: "auto" (Triton on CUDA, torch on CPU), "torch" or "triton".
    """
    if resolve_backend(backend, x) == "torch":
        add_lora_reference(y, x, lora_a, lora_b, ranks, scales, token_slots)
        return
    # Grouped on the device with torch ops: no host sync, a capacity-sized grid.
    segments = segments_from_slot_tensor(token_slots, lora_a.shape[0])
    lora_linear(
        y,
        x,
        lora_a,
        lora_b,
        ranks[:, None],
        scales[:, None],
        (0, y.shape[1]),
        segments,
        backend="triton",
    )


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    ranks: torch.Tensor,
    segments: LoraSegments,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """v[t, i*R : i*R + r] = x[t] @ lora_a[s, i*R : i*R + r].T for every slice i of slot s.

    :param x: [num_tokens, in_features].
    :param lora_a: [num_slots, num_slices * max_rank, in_features].
    :param ranks: [num_slots, num_slices] int32.
    :param segments: the step's token grouping from `build_segments`.
    :return: [num_tokens, num_slices * max_rank] float32. The reference zeroes the entries that
        no (token, column within rank) pair owns; the Triton path leaves them unwritten, since
        `lora_expand` never reads them.
    """
    if resolve_backend(backend, x) == "torch":
        return lora_shrink_reference(x, lora_a, ranks, segments.token_slots)
    shrink, _ = _triton_ops()
    return shrink.sgmv_shrink(x, lora_a, ranks, segments)


def lora_expand(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    slice_offsets: Sequence[int],
    segments: LoraSegments,
    *,
    backend: Backend = "auto",
) -> None:
    """y[t, o_i : o_{i+1}] += scales[s, i] * v[t, i*R : i*R + r] @ lora_b[s, o_i : o_{i+1}, :r].T.

    :param y: [num_tokens, out_features], updated in place.
    :param v: [num_tokens, num_slices * max_rank] float32 from `lora_shrink`.
    :param lora_b: [num_slots, out_features, max_rank], out-major or rank-major (`new_lora_b`,
        the slot pool's layout: a rank-r adapter then reads only its r rows of B).
    :param ranks: [num_slots, num_slices] int32.
    :param scales: [num_slots, num_slices] float32.
    :param slice_offsets: num_slices + 1 host ints: where each output slice starts, then the end.
    :param segments: the step's token grouping from `build_segments`.
    """
    if resolve_backend(backend, y) == "torch":
        lora_expand_reference(
            y, v, lora_b, ranks, scales, slice_offsets, segments.token_slots
        )
        return
    _, expand = _triton_ops()
    expand.sgmv_expand(y, v, lora_b, ranks, scales, slice_offsets, segments)
