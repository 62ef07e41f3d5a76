"""Batches for the paged attention tests (no tests here): the CPU interpreter and GPU tests share them.

A batch is a plan of sequences, each (cached, new): `cached` positions already in the KV cache
from earlier steps, `new` query tokens this step (a decode has new = 1); PAD is a padding
sequence of a CUDA-graph bucket (one query token, seq_len 0, slot_mapping -1). The cache starts
as NaN everywhere, so a read of any row that no sequence owns (past a sequence's length, or
a block it does not hold) turns the output into NaN. Unused block-table entries point at a
block of NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PAD = None


@dataclass
class AttentionBatch:
    plan: list  # (cached, new) per sequence, or PAD
    query: torch.Tensor  # [T, H, D]
    key: torch.Tensor  # [T, KVH, D], this step's keys
    value: torch.Tensor  # [T, KVH, D]
    key_cache: torch.Tensor  # [num_blocks, block_size, KVH, D], the cached part written
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # [S, max_blocks] int32
    query_start_loc: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32
    slot_mapping: torch.Tensor  # [T] int64
    full_keys: list  # per sequence [seq_len, KVH, D] in the cache dtype (None for PAD)
    full_values: list
    max_query_len: int
    max_seq_len: int

    @property
    def pad_rows(self) -> torch.Tensor:
        """[T] bool: the query rows of padding sequences."""
        rows = torch.zeros(self.query.shape[0], dtype=torch.bool)
        starts = self.query_start_loc.tolist()
        for i, entry in enumerate(self.plan):
            if entry is PAD:
                rows[starts[i] : starts[i + 1]] = True
        return rows.to(self.query.device)


def make_batch(
    plan: list,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    spare_blocks: int = 3,
) -> AttentionBatch:
    """Random inputs for `plan`; the cached positions are already in the cache."""
    gen = torch.Generator().manual_seed(seed)
    data_gen = torch.Generator(device=device).manual_seed(
        seed
    )  # big GPU cases: no host randn
    totals = [0 if e is PAD else e[0] + e[1] for e in plan]
    news = [1 if e is PAD else e[1] for e in plan]
    blocks_per_seq = [-(-t // block_size) for t in totals]
    num_blocks = sum(blocks_per_seq) + spare_blocks + 1  # + the NaN block
    poison_block = num_blocks - 1
    order = torch.randperm(num_blocks - 1, generator=gen).tolist()
    max_blocks = max(1, *blocks_per_seq)
    tables = torch.full((len(plan), max_blocks), poison_block, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    value_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    flat_k = key_cache.view(-1, num_kv_heads, head_dim)
    flat_v = value_cache.view(-1, num_kv_heads, head_dim)

    def randn(*size):
        return torch.randn(*size, generator=data_gen, device=device).to(dtype)

    full_keys, full_values, slots, new_k, new_v = [], [], [], [], []
    for i, entry in enumerate(plan):
        blocks = [order.pop() for _ in range(blocks_per_seq[i])]
        tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        if entry is PAD:
            full_keys.append(None)
            full_values.append(None)
            slots.append(torch.tensor([-1]))
            new_k.append(randn(1, num_kv_heads, head_dim))
            new_v.append(randn(1, num_kv_heads, head_dim))
            continue
        cached, _ = entry
        k = randn(totals[i], num_kv_heads, head_dim)
        v = randn(totals[i], num_kv_heads, head_dim)
        positions = torch.arange(totals[i])
        rows = tables[i].long()[positions // block_size] * block_size
        rows = (rows + positions % block_size).to(device)
        flat_k[rows[:cached]] = k[:cached]
        flat_v[rows[:cached]] = v[:cached]
        slots.append(rows[cached:].cpu())
        new_k.append(k[cached:])
        new_v.append(v[cached:])
        full_keys.append(k)
        full_values.append(v)
    starts = [0]
    for n in news:
        starts.append(starts[-1] + n)
    query = randn(starts[-1], num_heads, head_dim)
    as_int32 = {"dtype": torch.int32, "device": device}
    return AttentionBatch(
        plan=plan,
        query=query,
        key=torch.cat(new_k),
        value=torch.cat(new_v),
        key_cache=key_cache,
        value_cache=value_cache,
        block_tables=tables.to(device),
        query_start_loc=torch.tensor(starts, **as_int32),
        seq_lens=torch.tensor(totals, **as_int32),
        slot_mapping=torch.cat(slots).to(device),
        full_keys=full_keys,
        full_values=full_values,
        max_query_len=max(news),
        max_seq_len=max(totals),
    )


def expected_output(
    batch: AttentionBatch, sliding_window: int | None = None, chunk: int = 512
) -> torch.Tensor:
    """The definition in float64 over each sequence's contiguous keys; zeros for PAD rows."""
    query = batch.query
    group = query.shape[1] // batch.key_cache.shape[2]
    scale = query.shape[2] ** -0.5
    out = torch.zeros(query.shape, dtype=torch.float64, device=query.device)
    starts = batch.query_start_loc.tolist()
    for i, entry in enumerate(batch.plan):
        if entry is PAD:
            continue
        cached, new = entry
        keys = batch.full_keys[i].double().repeat_interleave(group, 1)
        values = batch.full_values[i].double().repeat_interleave(group, 1)
        k_pos = torch.arange(cached + new, device=query.device)
        for lo in range(0, new, chunk):  # bounded memory for 8k-token prefills
            hi = min(new, lo + chunk)
            q = query[starts[i] + lo : starts[i] + hi].double()
            q_pos = torch.arange(cached + lo, cached + hi, device=query.device)
            scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
            visible = k_pos[None, :] <= q_pos[:, None]
            if sliding_window is not None:
                visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
            scores = scores.masked_fill(~visible[None], float("-inf"))
            out[starts[i] + lo : starts[i] + hi] = torch.einsum(
                "hqk,khd->qhd", scores.softmax(-1), values
            )
    return out


def expected_caches(batch: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The caches after this step's write, by plain indexing (padding tokens skipped)."""
    key_cache, value_cache = batch.key_cache.clone(), batch.value_cache.clone()
    kvh, dim = key_cache.shape[2:]
    keep = batch.slot_mapping >= 0
    rows = batch.slot_mapping[keep]
    key_cache.view(-1, kvh, dim)[rows] = batch.key[keep]
    value_cache.view(-1, kvh, dim)[rows] = batch.value[keep]
    return key_cache, value_cache


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """‖got − expected‖ / ‖expected‖ in float64 (NaN anywhere gives NaN)."""
    diff = (got.double() - expected.double()).norm()
    return (diff / expected.double().norm().clamp_min(1e-30)).item()


def worst_sequence_error(
    batch: AttentionBatch, out: torch.Tensor, expected: torch.Tensor
) -> float:
    """The largest relative error of one sequence's rows (PAD rows excluded)."""
    starts = batch.query_start_loc.tolist()
    errors = [
        relative_error(
            out[starts[i] : starts[i + 1]], expected[starts[i] : starts[i + 1]]
        )
        for i, entry in enumerate(batch.plan)
        if entry is not PAD and entry[1] > 0
    ]
    if any(math.isnan(e) for e in errors):
        return math.inf
    return max(errors, default=0.0)
