"""y[t, o_i + n] += scales[s, i] · Σ_{j < ranks[s, i]} v[t, i·R + j] · B[s, o_i + n, j], G blocks of n a program.

The multi-block variant of the SGMV expand (`expand.py` holds the per-block one and picks
between them), written for decode tiles of up to 16 tokens of one adapter. The per-block kernel
gives each program one block of output columns: for one decode token that is 4 KB of B behind
about four dependent memory round trips (tile metadata → rank and tokens → v and B → y), and on
an H100 it reached only 44–53% of copy bandwidth at T = 64/256 with 55% of scheduler cycles
stalled (latency-bound, not bandwidth-bound).

Here one program takes a group of up to `blocks_per_program` consecutive output blocks of one
slice: tile metadata, rank, scale and v are loaded once per program, and the loop over the
blocks keeps the next block's B and y loads in flight while this block's product runs. Two
ways, chosen by the config: PREFETCH issues the next block's loads by hand one iteration ahead
(register double buffering, one compiler stage); otherwise `tl.range(num_stages=...)` lets
Triton's software pipeliner do it. Groups never straddle slices; the groups of the slices lie
back to back along grid axis 0 and axis 1 is the tile, so the grid depends only on host ints
(shapes and the segments' capacity) and replays in a CUDA graph for any batch.

Ranks as in the per-block kernel: up to 16 in one 16-wide step, beyond that steps of BLOCK_R
(the first one prefetched, the rest only up to the slot's own rank); a slice of rank 0 exits.
Where the pool's max_rank is a multiple of 8, v, and an out-major B, are read up to the rank
rounded up to 8 (16-byte loads, no extra 32-byte sector) and zeroed past the rank in registers.
A rank-major B (the slot pool's, `layout.py`) is read exactly to the rank: its rows run along
the output, so its loads are vectorized along the columns, and a row past the rank would cost
a whole row of bytes. v (float32) is rounded to the activation dtype for the product, which
accumulates in float32.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import dot_precision, kernel_for, next_pow2, num_sms
from ._tiles import load_tile
from .segments import LoraSegments


@triton.jit
def _output_group(
    pid_g, slice_offsets, slice_first_groups, NUM_SLICES: tl.constexpr, GROUP_N
):
    """(slice_id, first column, end column) of the group of output blocks `pid_g`."""
    slice_id = 0
    col_start = slice_offsets[0]
    col_end = slice_offsets[1]
    first_group = slice_first_groups[0]
    for i in tl.static_range(1, NUM_SLICES):
        here = pid_g >= slice_first_groups[i]
        slice_id = tl.where(here, i, slice_id)
        col_start = tl.where(here, slice_offsets[i], col_start)
        col_end = tl.where(here, slice_offsets[i + 1], col_end)
        first_group = tl.where(here, slice_first_groups[i], first_group)
    group_start = col_start + (pid_g - first_group) * GROUP_N
    return slice_id, group_start, tl.minimum(col_end, group_start + GROUP_N)


@triton.jit
def _rank_masks(offs_r, rank, RANK_VEC: tl.constexpr, B_RANK_VEC: tl.constexpr):
    """(r_valid: below the rank, v_load and b_load: what to read of v and B). RANK_VEC (the
    pool's max_rank is a multiple of 8): v's reads run to the rank rounded up to 8, so that
    it comes in 16-byte vectors (a mask by the runtime rank itself splits them into 2-byte
    loads) and never in an extra 32-byte sector; B_RANK_VEC (that, and B out-major): B's
    reads too. `_load_v` and `_zero_past_rank` clear what was read past the rank."""
    r_valid = offs_r < rank
    r_up = offs_r < tl.multiple_of((rank + 7) // 8 * 8, 8)
    v_load = r_valid
    b_load = r_valid
    if RANK_VEC:
        v_load = r_up
    if B_RANK_VEC:
        b_load = r_up
    return r_valid, v_load, b_load


@triton.jit
def _zero_past_rank(b, r_valid, B_RANK_VEC: tl.constexpr):
    """B [STEP, n] with zeros in the rows past the rank, whatever the pool holds there (NaN
    included). Applied where B is used, not where it is loaded: a select right after the
    load would wait for the data and undo the prefetch."""
    if B_RANK_VEC:
        b = tl.where(r_valid[:, None], b, 0.0)
    return b


@triton.jit
def _load_v(v_rows, offs_r, r_valid, v_load, row_valid, dtype, RANK_VEC: tl.constexpr):
    """v [BLOCK_M, STEP] of ranks offs_r, zero past the rank, in the activation dtype."""
    v = tl.load(
        v_rows + offs_r[None, :], mask=row_valid[:, None] & v_load[None, :], other=0.0
    )
    if RANK_VEC:
        v = tl.where(r_valid[None, :], v, 0.0)
    return v.to(dtype)


@triton.jit
def _load_block(b_rows, y_rows, cols, cols_end, b_load, row_valid, stride_b_row):
    """(B [STEP, BLOCK_N], y [BLOCK_M, BLOCK_N]) of the block of columns `cols`; a block at
    or past `cols_end` loads nothing."""
    col_valid = cols < cols_end
    b = tl.load(
        b_rows + cols[None, :] * stride_b_row,
        mask=b_load[:, None] & col_valid[None, :],
        other=0.0,
    )
    y = tl.load(
        y_rows + cols[None, :], mask=row_valid[:, None] & col_valid[None, :], other=0.0
    )
    return b, y


@triton.jit
def _finish_block(
    acc, y_old, y_rows, v_rows, b_rows, cols, cols_end, rank, scale, row_valid,
    stride_b_row, stride_b_rank, STEP: tl.constexpr, RANK_LOOP: tl.constexpr,
    RANK_VEC: tl.constexpr, B_RANK_VEC: tl.constexpr, DOT_PRECISION,
):  # fmt: skip
    """Adds the rank steps past the first (RANK_LOOP: only up to `rank`) and stores y."""
    col_valid = cols < cols_end
    if RANK_LOOP:
        for r in range(STEP, rank, STEP):
            offs_r = r + tl.arange(0, STEP)
            r_valid, v_load, b_load = _rank_masks(offs_r, rank, RANK_VEC, B_RANK_VEC)
            b = tl.load(
                b_rows + r * stride_b_rank + cols[None, :] * stride_b_row,
                mask=b_load[:, None] & col_valid[None, :],
                other=0.0,
            )
            v = _load_v(v_rows, offs_r, r_valid, v_load, row_valid, b.dtype, RANK_VEC)
            b = _zero_past_rank(b, r_valid, B_RANK_VEC)
            acc += tl.dot(v, b, input_precision=DOT_PRECISION)
    y_new = y_old.to(tl.float32) + acc * scale
    mask = row_valid[:, None] & col_valid[None, :]
    tl.store(y_rows + cols[None, :], y_new.to(y_old.dtype), mask=mask)


@triton.jit
def _expand_group(
    y_rows, v_rows, b_slot, cols_start, cols_end, rank, scale, row_valid, stride_b_row,
    stride_b_rank, STEP: tl.constexpr, RANK_LOOP: tl.constexpr, RANK_VEC: tl.constexpr,
    B_RANK_VEC: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr,
    NUM_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """y[rows, cols_start : cols_end] += scale · v · Bᵀ, one BLOCK_N block at a time."""
    offs_r = tl.arange(0, STEP)
    r_valid, v_load, b_load = _rank_masks(offs_r, rank, RANK_VEC, B_RANK_VEC)
    b_rows = b_slot + offs_r[:, None] * stride_b_rank
    dtype = b_slot.dtype.element_ty
    v = _load_v(v_rows, offs_r, r_valid, v_load, row_valid, dtype, RANK_VEC)
    cols = cols_start + tl.arange(0, BLOCK_N)
    num_blocks = tl.cdiv(cols_end - cols_start, BLOCK_N)
    if PREFETCH:
        b_next, y_next = _load_block(
            b_rows, y_rows, cols, cols_end, b_load, row_valid, stride_b_row
        )
        for _ in range(num_blocks):
            b, y_old, cols_here = b_next, y_next, cols
            cols += BLOCK_N
            # The next block's loads go out before this block's product waits on its own.
            b_next, y_next = _load_block(
                b_rows, y_rows, cols, cols_end, b_load, row_valid, stride_b_row
            )
            b = _zero_past_rank(b, r_valid, B_RANK_VEC)
            acc = tl.dot(v, b, input_precision=DOT_PRECISION)
            _finish_block(
                acc, y_old, y_rows, v_rows, b_rows, cols_here, cols_end, rank, scale,
                row_valid, stride_b_row, stride_b_rank, STEP, RANK_LOOP, RANK_VEC,
                B_RANK_VEC, DOT_PRECISION,
            )  # fmt: skip
    else:
        for j in tl.range(0, num_blocks, num_stages=NUM_STAGES):
            cols_here = cols + j * BLOCK_N
            b, y_old = _load_block(
                b_rows, y_rows, cols_here, cols_end, b_load, row_valid, stride_b_row
            )
            b = _zero_past_rank(b, r_valid, B_RANK_VEC)
            acc = tl.dot(v, b, input_precision=DOT_PRECISION)
            _finish_block(
                acc, y_old, y_rows, v_rows, b_rows, cols_here, cols_end, rank, scale,
                row_valid, stride_b_row, stride_b_rank, STEP, RANK_LOOP, RANK_VEC,
                B_RANK_VEC, DOT_PRECISION,
            )  # fmt: skip


@triton.jit
def sgmv_expand_blocks_kernel(
    y_ptr, v_ptr, lora_b_ptr, ranks_ptr, scales_ptr,
    sorted_tokens_ptr, tile_starts_ptr, tile_lens_ptr, tile_slots_ptr,
    slice_offsets, slice_first_groups, max_rank,
    stride_y_token, stride_v_token, stride_b_slot, stride_b_row, stride_b_rank,
    stride_ranks_slot, stride_scales_slot,
    NUM_SLICES: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr,
    BLOCK_R: tl.constexpr, SMALL_R: tl.constexpr, RANK_LOOP: tl.constexpr,
    RANK_VEC: tl.constexpr, B_RANK_VEC: tl.constexpr, PREFETCH: tl.constexpr,
    NUM_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_g = tl.program_id(0)
    pid_tile = tl.program_id(1)
    tile_len, slot, row_valid, tokens = load_tile(
        tile_starts_ptr,
        tile_lens_ptr,
        tile_slots_ptr,
        sorted_tokens_ptr,
        pid_tile,
        BLOCK_M,
    )
    slice_id, cols_start, cols_end = _output_group(
        pid_g, slice_offsets, slice_first_groups, NUM_SLICES, BLOCKS * BLOCK_N
    )
    if ALIGNED:  # 16-byte y accesses (see `output_block` in _tiles.py)
        cols_start = tl.multiple_of(cols_start, 16)
    rank = tl.load(ranks_ptr + slot * stride_ranks_slot + slice_id)
    scale = tl.load(scales_ptr + slot * stride_scales_slot + slice_id)
    # An unused tile, or an adapter that leaves this slice alone.
    if (tile_len == 0) | (rank == 0):
        return
    y_rows = y_ptr + tokens[:, None] * stride_y_token
    v_rows = v_ptr + tokens[:, None] * stride_v_token + slice_id * max_rank
    b_slot = lora_b_ptr + slot * stride_b_slot
    if rank <= SMALL_R:
        # Ranks up to 16 take one narrow step, whatever the pool's max_rank.
        _expand_group(
            y_rows, v_rows, b_slot, cols_start, cols_end, rank, scale, row_valid,
            stride_b_row, stride_b_rank, SMALL_R, False, RANK_VEC, B_RANK_VEC, BLOCK_N,
            PREFETCH, NUM_STAGES, DOT_PRECISION,
        )  # fmt: skip
    else:
        _expand_group(
            y_rows, v_rows, b_slot, cols_start, cols_end, rank, scale, row_valid,
            stride_b_row, stride_b_rank, BLOCK_R, RANK_LOOP, RANK_VEC, B_RANK_VEC, BLOCK_N,
            PREFETCH, NUM_STAGES, DOT_PRECISION,
        )  # fmt: skip


@dataclass(frozen=True)
class ExpandBlocksConfig:
    """Tile shape and launch options of the multi-block expand (BLOCK_M comes from the
    segments)."""

    block_n: int
    blocks_per_program: int
    num_warps: int = 4
    # True: the next block's B and y loads issued by hand before this block's product, one
    # compiler stage. False: `tl.range(num_stages=num_stages)` pipelines the block loop.
    prefetch: bool = True
    num_stages: int = 1
    # Rank step past rank 16; None: the pool's max_rank rounded up to a power of two in
    # [16, 64], as in the per-block kernel.
    block_r: int | None = None


# Programs to keep in the grid: a group of blocks per program only where the tiles times the
# groups still give every multiprocessor this many programs. Guesses until measured.
PROGRAMS_PER_SM = 4
MAX_BLOCKS_PER_PROGRAM = 8


# The configs `benchmarks/bench_sgmv.py` times against the per-block kernel on the decode shapes
# (bf16, H100); the GPU tests hold every one of them to the float64 definition. The first is
# the per-block schedule with this kernel's 16-byte B loads: it separates the two effects.
DECODE_CANDIDATES = (
    ExpandBlocksConfig(128, 1, prefetch=False),
    *(ExpandBlocksConfig(128, n) for n in (2, 4, 8, 16)),
    ExpandBlocksConfig(64, 8),
    ExpandBlocksConfig(256, 4),
    ExpandBlocksConfig(256, 4, num_warps=8),
    ExpandBlocksConfig(128, 8, prefetch=False),
    ExpandBlocksConfig(128, 4, prefetch=False, num_stages=2),
    ExpandBlocksConfig(128, 8, prefetch=False, num_stages=3),
)


def _groups(widths: Sequence[int], block_n: int, blocks_per_program: int) -> list[int]:
    blocks = (-(-w // block_n) for w in widths)
    return [-(-b // blocks_per_program) for b in blocks]


@functools.lru_cache(maxsize=1024)  # called at every launch with a few shapes
def choose_expand_blocks_config(
    widths: tuple[int, ...], num_tiles: int, dtype: torch.dtype, device: torch.device
) -> ExpandBlocksConfig:
    """The most blocks per program (a power of two up to MAX_BLOCKS_PER_PROGRAM) that keeps
    PROGRAMS_PER_SM programs per multiprocessor; 128 columns of 16-bit y (64 of fp32), as the
    per-block kernel measured best. Depends on host ints only (`num_tiles` is the segments'
    capacity under CUDA graphs), never on the batch."""
    block_n = 64 if dtype == torch.float32 else 128
    target = PROGRAMS_PER_SM * num_sms(device)
    most_blocks = max(_groups(widths, block_n, 1), default=0)
    per_program = 1
    while (
        per_program < min(MAX_BLOCKS_PER_PROGRAM, most_blocks)
        and num_tiles * sum(_groups(widths, block_n, 2 * per_program)) >= target
    ):
        per_program *= 2
    return ExpandBlocksConfig(block_n=block_n, blocks_per_program=per_program)


def launch_expand_blocks(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    offsets: tuple[int, ...],
    segments: LoraSegments,
    block_m: int,
    cfg: ExpandBlocksConfig,
) -> None:
    """Grid and launch of the multi-block kernel, for inputs `expand.sgmv_expand` has checked
    (`check_expand_inputs`); `offsets` are host ints, `block_m` the tile rows."""
    if cfg.block_n % 16 or cfg.blocks_per_program < 1:
        raise ValueError(f"{cfg}: block_n a multiple of 16, blocks_per_program >= 1")
    if cfg.num_stages > 1 and (cfg.prefetch or block_m >= 64):
        # 64-row tiles make tl.dot a Hopper wgmma with v in registers, which ptxas < 13.3
        # miscompiled when pipelined (triton-lang/triton#9433); prefetch is its own pipeline.
        raise ValueError(f"{cfg}: num_stages > 1 wants prefetch off, tiles < 64 rows")
    max_rank = lora_b.shape[2]
    widths = [end - start for start, end in itertools.pairwise(offsets)]
    first_groups = [0]
    for groups in _groups(widths, cfg.block_n, cfg.blocks_per_program):
        first_groups.append(first_groups[-1] + groups)
    if first_groups[-1] == 0 or segments.num_tiles == 0:
        return
    block_r = cfg.block_r or min(64, max(16, next_pow2(max_rank)))
    grid = (first_groups[-1], segments.num_tiles)
    kernel_for(sgmv_expand_blocks_kernel, y)[grid](
        y,
        v,
        lora_b,
        ranks,
        scales,
        segments.sorted_tokens,
        segments.tile_starts,
        segments.tile_lens,
        segments.tile_slots,
        offsets,
        tuple(first_groups),
        max_rank,
        y.stride(0),
        v.stride(0),
        lora_b.stride(0),
        lora_b.stride(1),
        lora_b.stride(2),
        ranks.stride(0),
        scales.stride(0),
        NUM_SLICES=ranks.shape[1],
        ALIGNED=all(o % 16 == 0 for o in offsets),
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCKS=cfg.blocks_per_program,
        BLOCK_R=block_r,
        SMALL_R=16,
        RANK_LOOP=max_rank > block_r,
        RANK_VEC=max_rank % 8 == 0,
        # Rank-major B is read exactly to the rank (module docstring).
        B_RANK_VEC=max_rank % 8 == 0 and lora_b.stride(2) == 1,
        PREFETCH=cfg.prefetch,
        NUM_STAGES=cfg.num_stages,
        DOT_PRECISION=dot_precision(y.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
