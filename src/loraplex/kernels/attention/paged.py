"""out = paged_attention_reference(...) for a mixed batch, by the decode and prefill kernels.

A mixed batch launches two kernels over the same out: the prefill kernel for the sequences of
query length > 1 (only when the host int max_query_len says there are any) and the decode
kernel for those of query length 1; each skips the other's sequences after reading two ints of
query_start_loc. Two specialised kernels rather than one: decode is a stream of the cache that
wants a whole query group per program and split-K, prefill is compute-bound and wants big query
tiles. A decode-only step launches only the decode kernel (and its combine), with a grid made
of tensor shapes and host ints, as a CUDA graph needs.
"""

from __future__ import annotations

import torch

from ._launch import SUPPORTED_DTYPES, check_cache, check_int, check_rows
from .decode import DecodeConfig, choose_decode_config, launch_decode
from .prefill import PrefillConfig, choose_prefill_config, launch_prefill


def check_attention_inputs(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    sliding_window: int | None,
    max_query_len: int,
    max_seq_len: int,
) -> None:
    """Raise on shapes, dtypes, strides, devices or host ints the kernels do not take."""
    check_cache(key_cache, value_cache)
    if key_cache.stride() != value_cache.stride():
        raise ValueError("key_cache and value_cache need the same strides")
    num_kv_heads, head_dim = key_cache.shape[2:]
    if query.dim() != 3 or query.shape[2] != head_dim:
        raise ValueError(
            f"query must be [num_tokens, num_heads, {head_dim}], got {tuple(query.shape)}"
        )
    num_heads = query.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads for {num_kv_heads} KV heads")
    check_rows("query", query, num_heads, head_dim)
    if query.dtype not in SUPPORTED_DTYPES or query.dtype != key_cache.dtype:
        raise TypeError(f"query {query.dtype} and cache {key_cache.dtype}: one type")
    check_int("block_tables", block_tables, 2)
    check_int("query_start_loc", query_start_loc, 1)
    check_int("seq_lens", seq_lens, 1)
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_seqs + 1 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"{num_seqs} seq_lens, {query_start_loc.shape[0]} query_start_loc and "
            f"{block_tables.shape[0]} block table rows disagree"
        )
    tensors = (key_cache, value_cache, block_tables, query_start_loc, seq_lens)
    if any(t.device != query.device for t in tensors):
        raise ValueError("every attention tensor must live on the query's device")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if max_query_len < 1 or max_seq_len < 0:
        raise ValueError(
            f"max_query_len {max_query_len} must be >= 1, max_seq_len {max_seq_len} >= 0"
        )


def paged_attention_triton(
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
    out: torch.Tensor | None = None,
    decode_config: DecodeConfig | None = None,
    prefill_config: PrefillConfig | None = None,
) -> torch.Tensor:
    """The contract of `paged_attention_reference`, with fp32 accumulation, never syncing.

    :param query: [num_tokens, num_heads, head_dim] bf16/fp16/fp32, unit stride along
        head_dim (any token and head strides).
    :param key_cache: [num_blocks, block_size, num_kv_heads, head_dim], query's dtype.
    :param value_cache: same shape, dtype and strides as key_cache.
    :param block_tables: [num_seqs, max_blocks_per_seq] int32.
    :param query_start_loc: [num_seqs + 1] int32; every query row belongs to one sequence.
    :param seq_lens: [num_seqs] int32 (0 for a padding sequence: zero output).
    :param max_query_len: host int, an upper bound of the longest query length; 1 means a
        decode-only batch (only the decode kernel runs: rows of longer sequences stay unwritten).
    :param max_seq_len: host int, an upper bound of seq_lens (CUDA graphs pass max_model_len);
        it only sizes the split-K grid.
    :param out: optional [num_tokens, num_heads, head_dim] of query's dtype to write into.
    :param decode_config: overrides `choose_decode_config` (tests and benchmarks).
    :param prefill_config: overrides `choose_prefill_config`.
    :return: out.
    """
    check_attention_inputs(
        query,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        sliding_window,
        max_query_len,
        max_seq_len,
    )
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.dtype != query.dtype or out.stride(2) != 1:
        raise ValueError("out must be shaped and typed like query, unit stride last")
    num_seqs, num_kv_heads = seq_lens.shape[0], key_cache.shape[2]
    if query.shape[0] == 0 or num_seqs == 0:
        return out
    head_dim = query.shape[2]
    args = (query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, out)
    if max_query_len > 1:
        config = prefill_config or choose_prefill_config(
            head_dim, query.dtype, query.device
        )
        launch_prefill(*args, scale, sliding_window, config)
    config = decode_config or choose_decode_config(
        num_seqs, num_kv_heads, max_seq_len, head_dim, query.dtype, query.device
    )
    launch_decode(*args, scale, sliding_window, config)
    return out
