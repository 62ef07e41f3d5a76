"""The memory layout of B in a slot pool: rank-major storage behind the logical [slots, out, R].

Every op and reference takes `lora_b` by its logical shape [num_slots, out_features, max_rank]
and reads `B[s, n, :r]` only up to each slot's rank r. How that is laid out in memory decides
what the expand fetches:
- out-major (contiguous [slots, out, R], unit stride along the rank): each output row holds R
  ranks, so a rank-8 adapter in a rank-64 pool reads 16 useful bytes of every 128-byte row,
  half of each 32-byte sector it touches (mixed ranks measured 1.14-1.24x their ideal, H100);
- rank-major (contiguous [slots, R, out], seen through `transpose(1, 2)`): a slot's first r
  rank-rows are r contiguous rows of out_features, so a rank-r adapter reads exactly its own
  bytes, coalesced along the output, and the masked rows past r fetch nothing.
The kernels take both (unit stride along either the rank or the output); the pool is rank-major.
"""

from __future__ import annotations

import torch


def new_lora_b(
    num_slots: int,
    out_features: int,
    max_rank: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """Zeros for a pool's B: [num_slots, out_features, max_rank] viewed over rank-major storage.

    The view's strides are (max_rank·out, 1, out): `b[s, :, :r]` of a slot is its first r rows
    of storage, one dense block, so writing the B of a single-slice linear (o, down) into it is
    one dense copy from a source in the same layout (`rank_major`); a slice of a fused linear
    (q/k/v, gate/up) is a column range of those rows, a strided copy.
    """
    storage = torch.zeros(num_slots, max_rank, out_features, dtype=dtype, device=device)
    return storage.transpose(1, 2)


def rank_major(lora_b: torch.Tensor) -> torch.Tensor:
    """B ([..., out, rank]) with the same values over rank-major storage (no copy when it is
    already dense that way)."""
    return lora_b.transpose(-1, -2).contiguous().transpose(-1, -2)
