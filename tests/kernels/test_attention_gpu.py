"""The Triton paged attention and KV write on a CUDA GPU against float64 (pytest -m gpu).

Every plan of sequences (decodes, prompts, chunks over earlier context, padding) runs in bf16,
fp16 and fp32; the head shapes (Llama-3.1-8B 32/8/128, MHA 32/32/128, Qwen2-7B-like 28/4/128)
and block sizes (16, 32) rotate across plans, and bf16 also runs every plan on the 8B heads.
Inputs are fresh, the cache is NaN wherever no sequence owns a row, the output is
NaN-poisoned, and padding rows must come back exactly zero. Last, the decode path captured
in a CUDA graph replays, for other seq_lens and block tables, what eager computes.
"""

from __future__ import annotations

import random

import pytest
import torch
from test_attention_cases import (
    PAD,
    expected_output,
    make_batch,
    relative_error,
    worst_sequence_error,
)

from loraplex.kernels import attention
from loraplex.kernels.attention import paged_attention_reference

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HEADS = ((32, 8, 128), (32, 32, 128), (28, 4, 128))


def _decodes(count: int, low: int, high: int, seed: int) -> list:
    rng = random.Random(seed)
    return [(rng.randint(low, high) - 1, 1) for _ in range(count)]


# name → (plan, sliding_window)
PLANS = {
    "decode-b1-ctx1": ([(0, 1)], None),
    "decode-b1-ctx8192": ([(8191, 1)], None),
    "decode-b8-ctx640": (_decodes(8, 600, 640, 1), None),
    "decode-b16-ctx8192-split": (_decodes(16, 4000, 8192, 2), None),
    "decode-b64-ctx640": (_decodes(64, 600, 700, 3), None),
    "decode-b128-ctx4096-pads": (_decodes(123, 1, 4096, 4) + [PAD] * 5, None),
    "decode-b128-ctx8192": (_decodes(128, 1, 8192, 5), None),
    "prefill-1x8192": ([(0, 8192)], None),
    "prefill-16x512": ([(0, 512)] * 16, None),
    "chunk-over-context": ([(3000, 1000), (0, 77), (129, 2)], None),
    "mixed": (
        [(4096, 512), (0, 300), PAD, *_decodes(60, 1, 4096, 6), (0, 1), PAD],
        None,
    ),
    "window-4096": ([(8191, 1), (5000, 1), (100, 1), (6000, 700), (0, 5000)], 4096),
    "window-1000-mixed": ([(2500, 300), *_decodes(30, 1, 3000, 7), PAD], 1000),
}


def _cases():
    cases = []
    for n, name in enumerate(PLANS):
        for d, dtype in enumerate(DTYPES):
            heads = HEADS[(n + d) % len(HEADS)]
            cases.append((name, dtype, heads, (16, 32)[(n + d) % 2], 3 * n + d))
        if HEADS[n % len(HEADS)] != HEADS[0]:  # bf16 on the 8B heads, every plan
            cases.append((name, torch.bfloat16, HEADS[0], 16, 100 + n))
    return cases


def _check_write(batch, nan_before: int) -> None:
    """The written rows hold this step's keys and values bit for bit, and nothing else was
    written: each written row was NaN before (a step's new positions are unwritten rows),
    so the NaN count fell by exactly those rows (a full copy of an 8 GB cache is avoided)."""
    kv_heads, dim = batch.key_cache.shape[2:]
    keep = batch.slot_mapping >= 0
    rows = batch.slot_mapping[keep]
    assert torch.equal(batch.key_cache.view(-1, kv_heads, dim)[rows], batch.key[keep])
    assert torch.equal(
        batch.value_cache.view(-1, kv_heads, dim)[rows], batch.value[keep]
    )
    nan_after = batch.key_cache.isnan().sum() + batch.value_cache.isnan().sum()
    assert nan_before - nan_after.item() == 2 * rows.numel() * kv_heads * dim


@pytest.mark.parametrize("name, dtype, heads, block_size, seed", _cases())
def test_paged_attention_matches_float64(name, dtype, heads, block_size, seed):
    plan, window = PLANS[name]
    num_heads, num_kv_heads, head_dim = heads
    batch = make_batch(
        plan,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        device="cuda",
        seed=seed,
    )
    nan_before = batch.key_cache.isnan().sum() + batch.value_cache.isnan().sum()
    attention.write_kv(
        batch.key_cache, batch.value_cache, batch.key, batch.value, batch.slot_mapping
    )
    _check_write(batch, nan_before.item())
    from loraplex.kernels.attention.paged import paged_attention_triton

    out = torch.full_like(batch.query, float("nan"))
    paged_attention_triton(
        batch.query,
        batch.key_cache,
        batch.value_cache,
        batch.block_tables,
        batch.query_start_loc,
        batch.seq_lens,
        head_dim**-0.5,
        window,
        max_query_len=batch.max_query_len,
        max_seq_len=batch.max_seq_len,
        out=out,
    )
    assert torch.isfinite(out).all(), (
        "a row was not written, or read a row it does not own"
    )
    assert not out[batch.pad_rows].any(), "padding rows must be exactly zero"
    error = worst_sequence_error(batch, out, expected_output(batch, window))
    assert error < TOLERANCE[dtype], f"{name} {dtype} {heads}: {error:.2e}"


@pytest.mark.parametrize("batch_size", [4, 64])
def test_decode_graph_replays_for_any_seq_lens(batch_size):
    """One capture with max_seq_len = 8192 (split-K at B=4, one pass at B=64 on an H100),
    replayed for new lengths (some 0: padding), block tables, queries and keys."""
    heads, kv_heads, dim, block_size, max_len = 32, 8, 128, 16, 8192
    device, dtype = torch.device("cuda"), torch.bfloat16
    width = max_len // block_size
    num_blocks = batch_size * width + 1
    gen = torch.Generator(device=device).manual_seed(batch_size)
    key_cache = torch.randn(
        num_blocks, block_size, kv_heads, dim, generator=gen, device=device
    ).to(dtype)
    value_cache = torch.randn_like(key_cache)
    query = torch.empty(batch_size, heads, dim, dtype=dtype, device=device)
    key = torch.empty(batch_size, kv_heads, dim, dtype=dtype, device=device)
    value = torch.empty_like(key)
    tables = torch.empty(batch_size, width, dtype=torch.int32, device=device)
    seq_lens = torch.empty(batch_size, dtype=torch.int32, device=device)
    starts = torch.arange(batch_size + 1, dtype=torch.int32, device=device)
    slots = torch.empty(batch_size, dtype=torch.int64, device=device)

    def fill():
        lens = torch.randint(
            1, max_len + 1, (batch_size,), generator=gen, device=device
        )
        lens[::3] = torch.randint(1, 64, lens[::3].shape, generator=gen, device=device)
        lens[1::5] = 0  # padding sequences
        perm = torch.randperm(num_blocks - 1, generator=gen, device=device)
        tables.copy_(perm[: batch_size * width].view(batch_size, width))
        seq_lens.copy_(lens)
        last = (lens - 1).clamp_min(0)
        rows = torch.arange(batch_size, device=device)
        slot = tables[rows, last // block_size].long() * block_size + last % block_size
        slots.copy_(torch.where(lens > 0, slot, -1))
        for t in (query, key, value):
            t.copy_(torch.randn(t.shape, generator=gen, device=device))

    def step():
        attention.write_kv(key_cache, value_cache, key, value, slots)
        return attention.paged_attention(
            query,
            key_cache,
            value_cache,
            tables,
            starts,
            seq_lens,
            dim**-0.5,
            max_query_len=1,
            max_seq_len=max_len,
        )

    fill()
    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):
        fill()
        graph.replay()
        replayed = out.clone()
        eager = step()
        assert torch.equal(replayed, eager)
        expected = paged_attention_reference(
            query, key_cache, value_cache, tables, starts, seq_lens, dim**-0.5
        )
        pads = seq_lens == 0
        assert not replayed[pads].any() and torch.isfinite(replayed).all()
        assert relative_error(replayed[~pads], expected[~pads]) < 1e-2
