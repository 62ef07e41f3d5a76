"""Paged attention behind one function: the only module of the engine that calls the attention op."""

from __future__ import annotations

import torch

from loraplex.kernels import attention as attention_ops
from loraplex.kernels.attention import Backend

from .inputs import ForwardInputs


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    inputs: ForwardInputs,
    scale: float,
    sliding_window: int | None,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Store this step's k/v [T, KVH, D] in the cache, then attend with q [T, H, D] → [T, H, D].

    :param backend: "auto" runs the Triton kernels on CUDA tensors and the torch reference on
        CPU tensors; "torch" or "triton" force one (see `loraplex.kernels.attention`).
        Tokens whose slot_mapping is negative (padding) write nothing; sequences of seq_len 0
        give zeros. The grids come from `inputs.max_query_len` and `inputs.max_seq_len`, host
        ints, so nothing here waits for the device.
    """
    backend = attention_ops.resolve_backend(backend, q)
    key_cache, value_cache = kv
    attention_ops.write_kv(
        key_cache, value_cache, k, v, inputs.slot_mapping, backend=backend
    )
    return attention_ops.paged_attention(
        q,
        key_cache,
        value_cache,
        inputs.block_tables,
        inputs.query_start_loc,
        inputs.seq_lens,
        scale,
        sliding_window,
        max_query_len=inputs.max_query_len,
        max_seq_len=inputs.max_seq_len,
        backend=backend,
    )
