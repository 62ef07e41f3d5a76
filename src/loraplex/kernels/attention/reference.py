"""out[t] = softmax(q[t] · K[seq(t), :pos(t)+1]ᵀ · scale) · V[seq(t), :pos(t)+1], K/V read through block tables.

The torch reference of paged attention over a flat batch that mixes prefill chunks and decodes:
each sequence's query tokens are its newest positions, and they attend causally to everything
already in the KV cache for that sequence plus themselves. Grouped-query attention maps query head
h to KV head h // (num_heads // num_kv_heads). The KV cache is paged: row `slot` of the flattened
cache is `block_id * block_size + offset`.

Padding (CUDA-graph batch buckets pad a batch with dummy tokens and sequences):
- a token whose slot_mapping is negative is not written to the cache;
- a query token that sees no key (its sequence has seq_len 0, or more query tokens than
  context) gets an output of zeros, never NaN, and nothing of its block table is read.

It loops over sequences (never tokens) and reads the per-sequence lengths to the host: it is the
spec and the CPU path, not the GPU hot path.
"""

from __future__ import annotations

import torch


def write_kv_reference(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key_cache.flat[slot_mapping[t]] = key[t] (and the same for values) where slot_mapping[t] >= 0.

    :param key_cache: [num_blocks, block_size, num_kv_heads, head_dim], updated in place.
    :param value_cache: [num_blocks, block_size, num_kv_heads, head_dim], updated in place.
    :param key: [num_tokens, num_kv_heads, head_dim].
    :param value: [num_tokens, num_kv_heads, head_dim].
    :param slot_mapping: [num_tokens] int64 (or int32), the cache row of each token; negative
        for a padding token, which writes nothing.
    """
    num_kv_heads, head_dim = key_cache.shape[2:]
    keep = slot_mapping >= 0
    rows = slot_mapping[keep].long()
    key_cache.view(-1, num_kv_heads, head_dim)[rows] = key[keep].to(key_cache.dtype)
    value_cache.view(-1, num_kv_heads, head_dim)[rows] = value[keep].to(
        value_cache.dtype
    )


def paged_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached context, in float32.

    :param query: [num_tokens, num_heads, head_dim]; sequence i owns rows
        query_start_loc[i] : query_start_loc[i+1], which are its last positions
        (seq_len - query_len ... seq_len - 1). Every row belongs to one sequence.
    :param key_cache: [num_blocks, block_size, num_kv_heads, head_dim], already holding this
        step's keys.
    :param value_cache: [num_blocks, block_size, num_kv_heads, head_dim].
    :param block_tables: [num_seqs, max_blocks_per_seq] int32, block ids in position order;
        only the first ceil(seq_len / block_size) entries of a row are read.
    :param query_start_loc: [num_seqs + 1] int32.
    :param seq_lens: [num_seqs] int32, each sequence's context length including this step;
        0 for a padding sequence.
    :param scale: the softmax scale, usually head_dim ** -0.5.
    :param sliding_window: if set, a token at position p sees only positions > p - sliding_window.
    :return: [num_tokens, num_heads, head_dim] in the query's dtype; zeros for a query token that
        sees no key.
    """
    num_heads, head_dim = query.shape[1:]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for seq, seq_len in enumerate(seq_lens.tolist()):
        q_begin, q_end = starts[seq], starts[seq + 1]
        if q_end == q_begin:
            continue
        if seq_len == 0:  # a padding sequence: nothing to attend to
            out[q_begin:q_end] = 0
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = block_tables[seq, :num_blocks].long()
        keys = key_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        values = (
            value_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        )
        keys = keys.repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
        values = values.repeat_interleave(group, dim=1)
        q = query[q_begin:q_end].float()  # [q_len, num_heads, head_dim]
        scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
        q_positions = torch.arange(
            seq_len - (q_end - q_begin), seq_len, device=query.device
        )
        k_positions = torch.arange(seq_len, device=query.device)
        visible = k_positions[None, :] <= q_positions[:, None]
        if sliding_window is not None:
            visible &= k_positions[None, :] > q_positions[:, None] - sliding_window
        scores = scores.masked_fill(~visible[None], float("-inf"))
        # A row that sees nothing would be softmax(-inf...) = NaN: it is zero instead.
        probs = torch.softmax(scores, dim=-1).masked_fill(
            ~visible.any(dim=1)[None, :, None], 0.0
        )
        out[q_begin:q_end] = torch.einsum("hqk,khd->qhd", probs, values).to(query.dtype)
    return out
