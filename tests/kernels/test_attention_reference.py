"""Paged attention reference against dense causal attention on contiguous K/V (float64)."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels.attention import paged_attention_reference, write_kv_reference


def dense_attention(q, k, v, q_positions, sliding_window=None):
    """q [Tq, H, D] at q_positions over k/v [Tk, KVH, D] at positions 0..Tk-1, in float64."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / q.shape[-1] ** 0.5
    kpos = torch.arange(k.shape[0])
    mask = kpos[None, :] <= q_positions[:, None]
    if sliding_window is not None:
        mask &= kpos[None, :] > q_positions[:, None] - sliding_window
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_mixed_prefill_chunks_and_decodes(sliding_window):
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block_size, num_blocks = 4, 2, 8, 4, 32
    key_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    # (context before this step, new tokens): a fresh prefill, a later chunk, two decodes
    plan = [(0, 7), (6, 5), (13, 1), (2, 1)]
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, full_k, full_v, queries, starts = [], [], [], [], [0]
    slot_mapping, new_k, new_v = [], [], []
    for cached, new in plan:
        total = cached + new
        blocks = [free.pop() for _ in range(-(-total // block_size))]
        tables.append(blocks + [0] * (5 - len(blocks)))
        k = torch.randn(total, kv_heads, dim, generator=gen)
        v = torch.randn(total, kv_heads, dim, generator=gen)
        for p in range(total):
            row = blocks[p // block_size] * block_size + p % block_size
            if p < cached:  # already cached by earlier steps
                key_cache.view(-1, kv_heads, dim)[row] = k[p]
                value_cache.view(-1, kv_heads, dim)[row] = v[p]
            else:
                slot_mapping.append(row)
        new_k.append(k[cached:])
        new_v.append(v[cached:])
        full_k.append(k)
        full_v.append(v)
        queries.append(torch.randn(new, heads, dim, generator=gen))
        starts.append(starts[-1] + new)
    write_kv_reference(
        key_cache,
        value_cache,
        torch.cat(new_k),
        torch.cat(new_v),
        torch.tensor(slot_mapping),
    )
    out = paged_attention_reference(
        torch.cat(queries),
        key_cache,
        value_cache,
        torch.tensor(tables, dtype=torch.int32),
        torch.tensor(starts, dtype=torch.int32),
        torch.tensor([c + n for c, n in plan], dtype=torch.int32),
        dim**-0.5,
        sliding_window,
    )
    for i, (cached, new) in enumerate(plan):
        positions = torch.arange(cached, cached + new)
        ref = dense_attention(
            queries[i], full_k[i], full_v[i], positions, sliding_window
        )
        got = out[starts[i] : starts[i + 1]].double()
        assert ((got - ref).norm() / ref.norm()).item() < 1e-6


def test_padding_tokens_write_nothing_and_padding_sequences_give_zeros():
    """CUDA-graph buckets pad a batch with tokens of slot -1 in sequences of seq_len 0."""
    gen = torch.Generator().manual_seed(1)
    key_cache = torch.randn(4, 4, 2, 8, generator=gen)
    value_cache = torch.randn(4, 4, 2, 8, generator=gen)
    before = key_cache.clone(), value_cache.clone()
    key, value = (
        torch.randn(3, 2, 8, generator=gen),
        torch.randn(3, 2, 8, generator=gen),
    )
    write_kv_reference(key_cache, value_cache, key, value, torch.tensor([5, -1, -1]))
    assert torch.equal(key_cache.view(-1, 2, 8)[5], key[0])
    assert torch.equal(value_cache.view(-1, 2, 8)[5], value[0])
    for cache, old in zip((key_cache, value_cache), before, strict=True):
        flat, old = cache.view(-1, 2, 8), old.view(-1, 2, 8)
        assert torch.equal(flat[:5], old[:5]) and torch.equal(flat[6:], old[6:])

    query = torch.randn(3, 4, 8, generator=gen)
    out = paged_attention_reference(
        query,
        key_cache,
        value_cache,
        torch.tensor([[1, 0], [0, 0], [0, 0]], dtype=torch.int32),
        torch.tensor([0, 1, 2, 3], dtype=torch.int32),
        torch.tensor([6, 0, 0], dtype=torch.int32),
        0.3,
    )
    assert torch.isfinite(out).all()
    assert not out[1:].any()
    assert out[0].abs().sum() > 0


def test_a_query_token_that_sees_no_key_gets_zeros():
    """More query tokens than context (only a malformed or padding sequence has that)."""
    gen = torch.Generator().manual_seed(2)
    cache = torch.randn(2, 4, 1, 8, generator=gen)
    out = paged_attention_reference(
        torch.randn(3, 1, 8, generator=gen),
        cache,
        cache,
        torch.tensor([[0, 1]], dtype=torch.int32),
        torch.tensor([0, 3], dtype=torch.int32),
        torch.tensor([2], dtype=torch.int32),
        0.3,
    )
    assert not out[0].any() and torch.isfinite(out).all() and out[1:].abs().sum() > 0
