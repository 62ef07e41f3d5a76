"""The Triton paged attention and KV write on the CPU, in Triton's interpreter, against float64.

The interpreter must be on before triton decorates anything, so the cases run in a child pytest
with TRITON_INTERPRET=1; the parent only starts it (and checks what needs no kernel). Tiny
shapes, fp16 and fp32 (numpy has no bf16: bf16 is covered on the GPU). Every case draws fresh
random inputs over a NaN-filled cache and writes into a NaN-poisoned output.
"""

from __future__ import annotations

import pytest
import torch
from test_attention_cases import (
    PAD,
    expected_caches,
    expected_output,
    make_batch,
    relative_error,
    worst_sequence_error,
)

from interpreter import INTERPRETING, run_in_interpreter
from loraplex.kernels import attention

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3}

DECODES = [(5, 1), (17, 1), (40, 1), (0, 1), (31, 1)]
PREFILLS = [(0, 37), (0, 5), (0, 16), (0, 2)]
# Prefill chunks over earlier context, decodes, padding sequences, in no particular order.
# Contexts 20, 30, 16 and 45 put chunks at every kind of offset from a 16-position tile
# (30 + 2 ends a tile: an off-by-one in the unmasked range shows there).
MIXED = [(0, 23), (20, 19), PAD, (37, 1), (3, 1), (30, 17), (16, 16), (45, 2), PAD]


def test_kernels_in_the_interpreter():
    """Runs this file's cases in a child process with TRITON_INTERPRET=1."""
    run_in_interpreter(__file__)


def interpreted(test):
    """Marks a case for the TRITON_INTERPRET=1 child; the parent deselects it (conftest.py)."""
    test.interpreter_only = True
    return test


def _run(batch, sliding_window=None, decode_config=None, prefill_config=None):
    """Write this step's K/V with the Triton write, then attend into a NaN-poisoned out."""
    from loraplex.kernels.attention.kv_write import write_kv_triton
    from loraplex.kernels.attention.paged import paged_attention_triton

    want_k, want_v = expected_caches(batch)
    write_kv_triton(
        batch.key_cache,
        batch.value_cache,
        batch.key,
        batch.value,
        batch.slot_mapping,
    )
    # NaN == NaN here: the rows no token owns must still hold the NaN they started with
    assert torch.equal(batch.key_cache.nan_to_num(7.0), want_k.nan_to_num(7.0))
    assert torch.equal(batch.value_cache.nan_to_num(7.0), want_v.nan_to_num(7.0))
    out = torch.full_like(batch.query, float("nan"))
    paged_attention_triton(
        batch.query,
        batch.key_cache,
        batch.value_cache,
        batch.block_tables,
        batch.query_start_loc,
        batch.seq_lens,
        batch.query.shape[2] ** -0.5,
        sliding_window,
        max_query_len=batch.max_query_len,
        max_seq_len=batch.max_seq_len,
        out=out,
        decode_config=decode_config,
        prefill_config=prefill_config,
    )
    return out


def _check(batch, out, sliding_window=None):
    assert torch.isfinite(out).all(), (
        "a row was not written, or read a row it does not own"
    )
    pad = batch.pad_rows
    assert not out[pad].any(), "padding rows must be exactly zero"
    error = worst_sequence_error(batch, out, expected_output(batch, sliding_window))
    assert error < TOLERANCE[batch.query.dtype], error


def _batch(plan, dtype=torch.float32, group=2, head_dim=16, block_size=16, seed=0):
    kv_heads = 2 if group < 4 else 1  # the interpreter's time grows with the heads
    return make_batch(
        plan,
        num_heads=kv_heads * group,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        seed=seed,
    )


@interpreted
@pytest.mark.parametrize(
    "group, dtype", [(1, torch.float16), (2, torch.float32), (4, torch.float16)]
)
def test_decode_only(group, dtype):
    batch = _batch(DECODES, dtype, group, seed=group)
    _check(batch, _run(batch))


@interpreted
@pytest.mark.parametrize(
    "block_size, dtype", [(16, torch.float32), (32, torch.float16)]
)
def test_prefill_only(block_size, dtype):
    batch = _batch(PREFILLS, dtype, block_size=block_size, seed=block_size)
    _check(batch, _run(batch))


@interpreted
@pytest.mark.parametrize(
    "block_size, group, dtype",
    [
        (16, 1, torch.float32),
        (16, 4, torch.float16),
        (32, 1, torch.float16),
        (32, 4, torch.float32),
    ],
)
def test_mixed_chunks_decodes_and_padding(block_size, group, dtype):
    batch = _batch(MIXED, dtype, group, block_size=block_size, seed=10 + group)
    _check(batch, _run(batch))


@interpreted
@pytest.mark.parametrize("window", [1, 7, 30])
def test_sliding_window(window):
    """Windows shorter than, equal to and longer than a tile; mask edges inside tiles."""
    batch = _batch(MIXED + [(50, 1)], torch.float32, group=2, seed=20 + window)
    _check(batch, _run(batch, window), window)


@interpreted
@pytest.mark.parametrize("num_splits, window", [(1, 20), (2, None), (3, 20), (8, None)])
def test_split_k_decode(num_splits, window):
    """Slices of 16 positions: sequences of 1 to 61 positions leave some splits empty."""
    from loraplex.kernels.attention.decode import DecodeConfig

    plan = [(0, 1), (60, 1), (33, 1), PAD, (15, 1)]
    batch = _batch(plan, torch.float32, group=4, seed=30 + num_splits)
    out = _run(batch, window, decode_config=DecodeConfig(16, num_splits))
    _check(batch, out, window)


@interpreted
def test_default_configs_take_the_split_path():
    """One sequence x one KV head is fewer programs than the interpreter's 4 "SMs"."""
    from loraplex.kernels.attention.decode import choose_decode_config

    config = choose_decode_config(1, 1, 61, 16, torch.float32, torch.device("cpu"))
    assert config.num_splits == 4
    batch = _batch([(60, 1)], torch.float16, group=4, seed=40)
    _check(batch, _run(batch))


@interpreted
@pytest.mark.parametrize("head_dim", [8, 24])
def test_head_dim_not_a_power_of_two_or_below_16(head_dim):
    """Qwen3's tiny test model has head_dim 24: the tile pads to 32 and masks."""
    batch = _batch(MIXED, torch.float32, group=2, head_dim=head_dim, seed=50)
    _check(batch, _run(batch))


@interpreted
@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)])
def test_prefill_tiles_wider_or_narrower_than_key_tiles(tiles):
    from loraplex.kernels.attention.prefill import PrefillConfig

    config = PrefillConfig(*tiles, num_warps=4, num_stages=1)
    for window in (None, 9):
        batch = _batch(MIXED, torch.float32, group=2, seed=60 + tiles[0])
        _check(batch, _run(batch, window, prefill_config=config), window)


@interpreted
def test_strided_inputs_and_int32_slots():
    """q/k/v as the model makes them: views into one fused qkv row, not contiguous."""
    from loraplex.kernels.attention.kv_write import write_kv_triton

    batch = _batch(MIXED, torch.float32, group=2, seed=70)
    tokens, heads, dim = batch.query.shape
    kv_heads = batch.key.shape[1]
    fused = torch.cat(
        [batch.query.flatten(1), batch.key.flatten(1), batch.value.flatten(1)], 1
    )
    q, k, v = fused.split((heads * dim, kv_heads * dim, kv_heads * dim), 1)
    want_k, want_v = expected_caches(batch)
    write_kv_triton(
        batch.key_cache,
        batch.value_cache,
        k.view(tokens, kv_heads, dim),
        v.view(tokens, kv_heads, dim),
        batch.slot_mapping.int(),
    )
    assert torch.equal(batch.key_cache.nan_to_num(7.0), want_k.nan_to_num(7.0))
    assert torch.equal(batch.value_cache.nan_to_num(7.0), want_v.nan_to_num(7.0))
    out = attention.paged_attention(
        q.view(tokens, heads, dim),
        batch.key_cache,
        batch.value_cache,
        batch.block_tables,
        batch.query_start_loc,
        batch.seq_lens,
        dim**-0.5,
        max_query_len=batch.max_query_len,
        max_seq_len=batch.max_seq_len,
        backend="triton",
    )
    _check(batch, out)


@interpreted
def test_public_ops_match_the_reference_backend():
    batch = _batch(MIXED, torch.float32, group=2, seed=80)
    outs = []
    for backend in ("torch", "triton"):
        key_cache, value_cache = batch.key_cache.clone(), batch.value_cache.clone()
        attention.write_kv(
            key_cache,
            value_cache,
            batch.key,
            batch.value,
            batch.slot_mapping,
            backend=backend,
        )
        outs.append(
            attention.paged_attention(
                batch.query,
                key_cache,
                value_cache,
                batch.block_tables,
                batch.query_start_loc,
                batch.seq_lens,
                0.25,
                5,
                max_query_len=batch.max_query_len,
                max_seq_len=batch.max_seq_len,
                backend=backend,
            )
        )
    assert relative_error(outs[1], outs[0]) < 1e-5


def test_launchers_refuse_mismatched_inputs():
    from loraplex.kernels.attention.paged import paged_attention_triton

    b = _batch(MIXED, torch.float32, group=2, seed=90)

    def call(**change):
        args = {
            "query": b.query,
            "key_cache": b.key_cache,
            "value_cache": b.value_cache,
            "block_tables": b.block_tables,
            "query_start_loc": b.query_start_loc,
            "seq_lens": b.seq_lens,
            "scale": 0.25,
            "sliding_window": None,
            "max_query_len": b.max_query_len,
            "max_seq_len": b.max_seq_len,
            **change,
        }
        paged_attention_triton(**args)

    with pytest.raises(TypeError, match="one type"):
        call(query=b.query.half())
    with pytest.raises(TypeError, match="block_tables"):
        call(block_tables=b.block_tables.long())
    with pytest.raises(ValueError, match="query heads"):
        call(query=b.query[:, :3])
    with pytest.raises(ValueError, match="disagree"):
        call(seq_lens=b.seq_lens[:-1])
    with pytest.raises(ValueError, match="unit stride"):
        call(query=b.query.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="sliding_window"):
        call(sliding_window=0)
    with pytest.raises(ValueError, match="max_query_len"):
        call(max_query_len=0)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.write_kv(
            b.key_cache, b.value_cache, b.key, b.value, b.slot_mapping, backend="cuda"
        )


@pytest.mark.skipif(INTERPRETING, reason="checks the compiled mode")
def test_cpu_tensors_without_the_interpreter_are_an_error():
    pytest.importorskip("triton")
    b = _batch(DECODES, torch.float32, seed=100)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        attention.write_kv(
            b.key_cache,
            b.value_cache,
            b.key,
            b.value,
            b.slot_mapping,
            backend="triton",
        )
