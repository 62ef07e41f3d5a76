"""FP8 layers under tensor parallelism hold the one-GPU engine's weights: a row-parallel shard
(o, down) keeps its full row's scale instead of re-scaling its columns alone."""

from __future__ import annotations

import pytest
import torch

from loraplex.platform.model.layers import LoraLinear


def fp8_linear(in_features, out_sizes, shards=None):
    return LoraLinear(
        in_features,
        out_sizes,
        bias=False,
        dtype=torch.float32,
        device=torch.device("cpu"),
        quantization="fp8",
        shards=shards,
    )


def test_row_parallel_shards_keep_the_full_rows_scales():
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(24, 64, generator=gen)
    weight[:, 40] *= 50  # each row's largest entry lies in the second rank's columns
    whole = fp8_linear(64, [24])
    whole.load_slice("weight", 0, weight)
    for rank in range(2):
        columns = slice(32 * rank, 32 * (rank + 1))
        shard = fp8_linear(32, [24], shards=[(None, columns)])
        shard.load_slice("weight", 0, weight)
        assert torch.equal(shard.weight_scale, whole.weight_scale)
        assert torch.equal(shard.weight.float(), whole.weight[:, columns].float()), rank


def test_column_parallel_shards_take_their_rows_and_scales():
    gen = torch.Generator().manual_seed(12)
    weight = torch.randn(24, 64, generator=gen)
    whole = fp8_linear(64, [24])
    whole.load_slice("weight", 0, weight)
    rows = slice(12, 24)
    shard = fp8_linear(64, [12], shards=[(rows, None)])
    shard.load_slice("weight", 0, weight)
    assert torch.equal(shard.weight_scale, whole.weight_scale[rows])
    assert torch.equal(shard.weight.float(), whole.weight[rows].float())


def test_a_shard_of_the_wrong_shape_is_refused_with_its_shapes():
    shard = fp8_linear(32, [24], shards=[(None, slice(0, 32))])
    with pytest.raises(ValueError, match=r"\(24, 16\).*\(24, 32\)"):
        shard.load_slice("weight", 0, torch.randn(24, 16))
