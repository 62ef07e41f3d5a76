"""Paged attention behind one function: the only module of the engine that calls the attention op."""

from __future__ import annotations

import torch

from loraplex.kernels.attention import paged_attention_reference, write_kv_reference

from .inputs import ForwardInputs


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    inputs: ForwardInputs,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Store this step's k/v [T, KVH, D] in the cache, then attend with q [T, H, D] → [T, H, D]."""
    key_cache, value_cache = kv
    write_kv_reference(key_cache, value_cache, k, v, inputs.slot_mapping)
    return paged_attention_reference(
        q,
        key_cache,
        value_cache,
        inputs.block_tables,
        inputs.query_start_loc,
        inputs.seq_lens,
        scale,
        sliding_window,
    )
