"""Paged attention over a mixed batch of prefill chunks and decodes, with the KV-cache write.

Public ops:
- `write_kv(key_cache, value_cache, key, value, slot_mapping)`: store this step's keys and
  values in the paged cache (negative slots are padding and write nothing).
- `paged_attention(query, key_cache, value_cache, block_tables, query_start_loc, seq_lens,
  scale, sliding_window, max_query_len=..., max_seq_len=...)`: causal attention of each
  sequence's new tokens over its cached context, GQA, optional sliding window.

`backend="auto"` runs Triton on CUDA tensors and the torch reference on CPU tensors; `"torch"`
forces the reference; `"triton"` forces the kernels (on CPU tensors only in Triton's
interpreter, `TRITON_INTERPRET=1`). Nothing falls back silently from one backend to another.
"""

from __future__ import annotations

from typing import Literal

import torch

from .reference import paged_attention_reference, write_kv_reference

Backend = Literal["auto", "torch", "triton"]

__all__ = [
    "Backend",
    "paged_attention",
    "paged_attention_reference",
    "resolve_backend",
    "write_kv",
    "write_kv_reference",
]


def resolve_backend(
    backend: Backend, tensor: torch.Tensor
) -> Literal["torch", "triton"]:
    """The backend that will run for `backend` on tensors living where `tensor` lives."""
    if backend == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(
            f"unknown attention backend {backend!r}; expected 'auto', 'torch' or 'triton'"
        )
    return backend


def write_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> None:
    """key_cache.flat[slot_mapping[t]] = key[t], value_cache likewise, where slot_mapping[t] >= 0.

    Shapes as in `write_kv_reference`; the caches are updated in place.
    """
    if resolve_backend(backend, key) == "torch":
        write_kv_reference(key_cache, value_cache, key, value, slot_mapping)
        return
    from .kv_write import write_kv_triton  # triton exists only on Linux x86-64 hosts

    write_kv_triton(key_cache, value_cache, key, value, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    max_query_len: int,
    max_seq_len: int,
    backend: Backend = "auto",
) -> torch.Tensor:
    """out[t] = softmax(q[t] · K[seq(t), visible(t)]ᵀ · scale) · V[seq(t), visible(t)].

    Shapes and padding rules as in `paged_attention_reference`. The host ints size the
    Triton grids (never read back from the device): max_query_len is an upper bound of the
    longest query length of the batch (1 = decode only), max_seq_len of the longest context.

    :return: [num_tokens, num_heads, head_dim] in the query's dtype.
    """
    if resolve_backend(backend, query) == "torch":
        return paged_attention_reference(
            query,
            key_cache,
            value_cache,
            block_tables,
            query_start_loc,
            seq_lens,
            scale,
            sliding_window,
        )
    from .paged import paged_attention_triton

    return paged_attention_triton(
        query,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        scale,
        sliding_window,
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
    )
