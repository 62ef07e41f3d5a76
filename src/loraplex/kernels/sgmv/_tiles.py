"""Device helpers the SGMV kernels share: a program's tile of tokens, its block of output columns.

Both issue their loads before any early exit, so that a program waits on two rounds of memory
latency (tile metadata, then ranks and token indices) instead of one round per dependent load.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_tile(
    tile_starts_ptr,
    tile_lens_ptr,
    tile_slots_ptr,
    sorted_tokens_ptr,
    pid_tile,
    BLOCK_M: tl.constexpr,
):
    """(tile_len, slot, row_valid [BLOCK_M], tokens [BLOCK_M] int64) of tile `pid_tile`.

    Unused tiles have length 0 and slot 0, so every pointer built from them stays in bounds.
    """
    tile_len = tl.load(tile_lens_ptr + pid_tile)
    slot = tl.load(tile_slots_ptr + pid_tile).to(tl.int64)
    tile_start = tl.load(tile_starts_ptr + pid_tile)
    offs_m = tl.arange(0, BLOCK_M)
    row_valid = offs_m < tile_len
    tokens = tl.load(sorted_tokens_ptr + tile_start + offs_m, mask=row_valid, other=0)
    return tile_len, slot, row_valid, tokens.to(tl.int64)


@triton.jit
def output_block(
    pid_n,
    slice_offsets,
    slice_first_blocks,
    NUM_SLICES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """(slice_id, offs_n [BLOCK_N], col_valid [BLOCK_N]) of output block `pid_n`.

    The blocks of the slices are laid back to back along the grid axis, so a narrow slice (k or
    v under GQA) launches only its own blocks. ALIGNED: every slice starts at a multiple of 16
    columns (the launcher checks), which lets y be read and written 16 bytes at a time; the
    compiler cannot see it through the slice selection and would use 2-byte accesses.
    """
    slice_id = 0
    col_start = slice_offsets[0]
    col_end = slice_offsets[1]
    first_block = slice_first_blocks[0]
    for i in tl.static_range(1, NUM_SLICES):
        here = pid_n >= slice_first_blocks[i]
        slice_id = tl.where(here, i, slice_id)
        col_start = tl.where(here, slice_offsets[i], col_start)
        col_end = tl.where(here, slice_offsets[i + 1], col_end)
        first_block = tl.where(here, slice_first_blocks[i], first_block)
    if ALIGNED:
        col_start = tl.multiple_of(col_start, 16)
    offs_n = col_start + (pid_n - first_block) * BLOCK_N + tl.arange(0, BLOCK_N)
    return slice_id, offs_n, offs_n < col_end
