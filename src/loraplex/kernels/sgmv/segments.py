"""Segment metadata: the tokens of one step grouped by adapter slot, built once per step.

Every LoRA linear of every layer in a step reads the same metadata, so it is built once per step
from the scheduler's host ints and copied to the device in one transfer; nothing in a kernel
launch reads it back to the host.

A segment is the run of tokens (in `sorted_tokens` order) that share one slot. The Triton kernels
work on tiles: each segment is cut into tiles of at most `tile_tokens` tokens, and one program
handles one tile. A 1-token decode segment and a 512-token prefill chunk therefore share one
launch, and the grid is sized by the number of tiles, never by the longest segment. Tiles whose
length is 0 (the unused tail of a preallocated buffer, or an empty segment) exit at once, so a
grid fixed by buffer capacity stays correct under CUDA-graph replay whatever the batch holds.

Three builders:
- `build_segments(token_slots, device)`: from host ints, exact sizes (eager steps).
- `LoraSegmentBuffers.make(...)` + `.fill(token_slots)`: fixed addresses and capacity-sized grid,
  for CUDA-graph capture and replay.
- `segments_from_slot_tensor(token_slots, num_slots)`: from a device tensor with torch ops only
  (no host sync); used by the functional `add_lora`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

# 64 rows fills one Hopper warpgroup MMA and re-reads an adapter's A and B once per 64 tokens of
# a prefill chunk; decode tiles (1 token) get a smaller BLOCK_M from `max_tile_len`.
DEFAULT_TILE_TOKENS = 64
# Split-K counters per tile: one per block of shrink output columns (S·R / BLOCK_N <= 32).
COUNTERS_PER_TILE = 32


@dataclass(frozen=True)
class LoraSegments:
    """Which tokens of a flat batch use which adapter slot, grouped for the SGMV kernels.

    Tokens of base-only requests (slot -1) belong to no segment and no tile: they cost nothing.
    """

    token_slots: torch.Tensor  # [num_tokens] int32, -1 = base model only
    sorted_tokens: (
        torch.Tensor
    )  # [>= num_lora_tokens] int32, token indices by ascending slot
    segment_starts: torch.Tensor  # [num_segments + 1] int32, offsets into sorted_tokens
    segment_slots: torch.Tensor  # [num_segments] int32, the slot of each segment
    tile_starts: (
        torch.Tensor
    )  # [num_tiles] int32, first entry of each tile in sorted_tokens
    tile_lens: torch.Tensor  # [num_tiles] int32, tokens in each tile; 0 = unused, exits
    tile_slots: torch.Tensor  # [num_tiles] int32, the slot of each tile (>= 0)
    # [num_tiles * COUNTERS_PER_TILE] int32: the shrink's split-K arrival counters. Zero between
    # launches (each launch resets what it used), so every layer of a step reuses them; launches
    # sharing one LoraSegments must run one after another on one stream.
    split_counters: torch.Tensor
    num_lora_tokens: (
        int  # host: tokens that belong to some segment (an upper bound at most)
    )
    num_segments: int  # host: segments in segment_slots (some may be empty)
    num_tiles: int  # host: the kernels' grid size along tiles
    tile_tokens: int  # host: the most tokens one tile may hold (a power of two >= 16)
    max_tile_len: (
        int  # host: an upper bound of tile_lens, which sizes the kernels' BLOCK_M
    )

    @property
    def has_lora(self) -> bool:
        """False when every token of the batch is base-only: LoRA work can be skipped entirely."""
        return self.num_lora_tokens > 0


def _check_tile_tokens(tile_tokens: int) -> None:
    if tile_tokens < 16 or tile_tokens & (tile_tokens - 1):
        raise ValueError(f"tile_tokens must be a power of two >= 16, got {tile_tokens}")


def max_tiles(max_tokens: int, max_slots: int, tile_tokens: int) -> int:
    """Most tiles a batch can need: each slot's segment adds at most one partial tile."""
    return -(-max_tokens // tile_tokens) + min(max_slots, max_tokens)


class _Grouping(NamedTuple):
    """One step's tokens grouped by slot, as host int64 arrays."""

    sorted_tokens: (
        np.ndarray
    )  # token indices by ascending slot (stable), slot -1 left out
    segment_starts: np.ndarray  # [num_segments + 1]
    segment_slots: np.ndarray  # [num_segments], ascending
    tile_starts: np.ndarray  # [num_tiles]
    tile_lens: np.ndarray  # [num_tiles], 1..tile_tokens
    tile_slots: np.ndarray  # [num_tiles]


def _group(token_slots: np.ndarray, tile_tokens: int) -> _Grouping:
    """`_group_on_host` with numpy: no Python loop over tokens (a mixed step has thousands)."""
    lora_tokens = np.flatnonzero(token_slots >= 0)
    order = lora_tokens[np.argsort(token_slots[lora_tokens], kind="stable")]
    slots, counts = np.unique(token_slots[order], return_counts=True)
    starts = np.zeros(len(slots) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    tiles_per_segment = -(-counts // tile_tokens)
    segment_of_tile = np.repeat(np.arange(len(slots)), tiles_per_segment)
    first_tile = np.cumsum(tiles_per_segment) - tiles_per_segment
    offset = (
        np.arange(len(segment_of_tile)) - first_tile[segment_of_tile]
    ) * tile_tokens
    return _Grouping(
        order,
        starts,
        slots,
        starts[segment_of_tile] + offset,
        np.minimum(tile_tokens, counts[segment_of_tile] - offset),
        slots[segment_of_tile],
    )


def _group_on_host(
    token_slots: Sequence[int], tile_tokens: int
) -> tuple[list[int], list[int], list[int], list[tuple[int, int, int]]]:
    """(sorted_tokens, segment_starts, segment_slots, tiles as (start, length, slot)).

    The spec of `_group`, in plain Python (tests hold one to the other)."""
    by_slot: dict[int, list[int]] = {}
    for token, slot in enumerate(token_slots):
        if slot >= 0:
            by_slot.setdefault(slot, []).append(token)
    slots = sorted(by_slot)
    sorted_tokens: list[int] = []
    starts = [0]
    tiles: list[tuple[int, int, int]] = []
    for slot in slots:
        begin = len(sorted_tokens)
        sorted_tokens.extend(by_slot[slot])
        end = len(sorted_tokens)
        starts.append(end)
        for tile_start in range(begin, end, tile_tokens):
            tiles.append((tile_start, min(tile_tokens, end - tile_start), slot))
    return sorted_tokens, starts, slots, tiles


def build_segments(
    token_slots: Sequence[int],
    device: torch.device | str = "cpu",
    *,
    tile_tokens: int = DEFAULT_TILE_TOKENS,
) -> LoraSegments:
    """Group the tokens of one step by slot, from host ints, with one host→device copy.

    :param token_slots: the slot of each token in batch order, -1 for base-only tokens.
    :param device: where the kernels will read the metadata.
    :param tile_tokens: the most tokens one kernel program handles (a power of two >= 16).
    """
    _check_tile_tokens(tile_tokens)
    slots_of_tokens = np.asarray(token_slots, dtype=np.int64).reshape(-1)
    grouping = _group(slots_of_tokens, tile_tokens)
    parts = [slots_of_tokens, *grouping]
    host = torch.from_numpy(np.concatenate(parts).astype(np.int32))
    packed = host.to(device, non_blocking=True)
    views, offset = [], 0
    for part in parts:
        views.append(packed[offset : offset + len(part)])
        offset += len(part)
    num_tiles = len(grouping.tile_lens)
    counters = torch.zeros(num_tiles * COUNTERS_PER_TILE, dtype=torch.int32)
    return LoraSegments(
        *views,
        split_counters=counters.to(device),
        num_lora_tokens=len(grouping.sorted_tokens),
        num_segments=len(grouping.segment_slots),
        num_tiles=num_tiles,
        tile_tokens=tile_tokens,
        max_tile_len=int(grouping.tile_lens.max(initial=0)),
    )


class LoraSegmentBuffers:
    """Segment metadata in preallocated device memory: fixed addresses, capacity-sized grid.

    Launches captured in a CUDA graph with the `LoraSegments` that `fill` returns stay valid for
    every later `fill` of at most `max_tokens` tokens and `max_slots` slots: the kernels' grid is
    sized by capacity (`max_tiles`), and tiles past this step's last one have length 0.
    """

    def __init__(
        self,
        max_tokens: int,
        max_slots: int,
        device: torch.device,
        tile_tokens: int,
    ) -> None:
        _check_tile_tokens(tile_tokens)
        self.max_tokens, self.max_slots, self.tile_tokens = (
            max_tokens,
            max_slots,
            tile_tokens,
        )
        self.max_tiles = max_tiles(max_tokens, max_slots, tile_tokens)
        self._sizes = (
            max_tokens,  # token_slots
            max_tokens,  # sorted_tokens
            max_slots + 1,  # segment_starts
            max_slots,  # segment_slots
            self.max_tiles,  # tile_starts
            self.max_tiles,  # tile_lens
            self.max_tiles,  # tile_slots
        )
        self.device = torch.device(device)
        pinned = self.device.type == "cuda"
        self._host = torch.zeros(sum(self._sizes), dtype=torch.int32, pin_memory=pinned)
        self._device = torch.zeros_like(self._host, device=self.device)
        self._split_counters = torch.zeros(
            self.max_tiles * COUNTERS_PER_TILE, dtype=torch.int32, device=self.device
        )
        # The host staging buffer is rewritten each step; the event says the last copy is done.
        self._copied = torch.cuda.Event() if pinned else None

    @classmethod
    def make(
        cls,
        max_tokens: int,
        max_slots: int,
        device: torch.device | str,
        tile_tokens: int = DEFAULT_TILE_TOKENS,
    ) -> LoraSegmentBuffers:
        return cls(max_tokens, max_slots, torch.device(device), tile_tokens)

    def fill(self, token_slots: Sequence[int] | np.ndarray) -> LoraSegments:
        """Write this step's grouping into the buffers (one copy) and return views of them.

        The views keep their addresses from fill to fill; only `token_slots` is sized by the
        batch, so a captured graph must be replayed with batches of the length it was captured at
        (pad with -1 tokens).
        """
        slots_of_tokens = np.asarray(token_slots, dtype=np.int64).reshape(-1)
        if len(slots_of_tokens) > self.max_tokens:
            raise ValueError(
                f"{len(slots_of_tokens)} tokens exceed the buffers' {self.max_tokens}"
            )
        if len(slots_of_tokens) and slots_of_tokens.max() >= self.max_slots:
            raise ValueError(
                f"slot {slots_of_tokens.max()} >= max_slots {self.max_slots}"
            )
        grouping = _group(slots_of_tokens, self.tile_tokens)
        # Past each part's used entries: base-only tokens, an empty tail segment, and unused
        # tiles of length 0 (the program exits) whose slot 0 keeps every pointer in bounds.
        fills = (-1, 0, grouping.segment_starts[-1], 0, 0, 0, 0)
        if self._copied is not None:
            self._copied.synchronize()
        host, offset = self._host.numpy(), 0
        for part, size, fill in zip(
            (slots_of_tokens, *grouping), self._sizes, fills, strict=True
        ):
            host[offset : offset + len(part)] = part
            host[offset + len(part) : offset + size] = fill
            offset += size
        self._device.copy_(self._host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return self.views(len(slots_of_tokens), len(grouping.sorted_tokens))

    def views(
        self, num_tokens: int, num_lora_tokens: int | None = None
    ) -> LoraSegments:
        """The buffers as `LoraSegments` of `num_tokens` tokens, whatever they hold now.

        CUDA-graph capture takes these views once; every later `fill` of `num_tokens` tokens
        changes what a replay reads, never where. `num_lora_tokens` defaults to the upper bound.
        """
        views, offset = [], 0
        for size in self._sizes:
            views.append(self._device[offset : offset + size])
            offset += size
        views[0] = views[0][:num_tokens]
        # `fill` packs the used tiles first, and `num_tokens` tokens need at most this many:
        # a graph captured for a small batch launches a small grid, not the buffers' capacity.
        num_tiles = min(
            self.max_tiles,
            max_tiles(num_tokens, min(num_tokens, self.max_slots), self.tile_tokens),
        )
        return LoraSegments(
            *views,
            split_counters=self._split_counters,
            num_lora_tokens=num_tokens if num_lora_tokens is None else num_lora_tokens,
            num_segments=self.max_slots,
            num_tiles=num_tiles,
            tile_tokens=self.tile_tokens,
            max_tile_len=self.tile_tokens,
        )


def segments_from_slot_tensor(
    token_slots: torch.Tensor,
    num_slots: int,
    *,
    tile_tokens: int = DEFAULT_TILE_TOKENS,
) -> LoraSegments:
    """Group tokens by slot with torch ops on the tensor's own device, with no host sync.

    Every slot gets a (possibly empty) segment and the grid is sized by capacity, since the
    number of distinct slots present is not known on the host.

    :param token_slots: [num_tokens] integer tensor, -1 = base model only.
    :param num_slots: slots in the adapter tensors; every token's slot must be below it.
    """
    _check_tile_tokens(tile_tokens)
    device = token_slots.device
    num_tokens = token_slots.shape[0]
    slots = token_slots.long()
    key = torch.where(slots < 0, num_slots, slots)  # base-only tokens sort last
    order = torch.sort(key, stable=True).indices
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_slots]
    segment_ends = torch.cumsum(counts, 0)
    segment_starts = segment_ends - counts
    tiles_per_slot = (counts + tile_tokens - 1) // tile_tokens
    tile_ends = torch.cumsum(
        tiles_per_slot, 0
    )  # [num_slots], exclusive end tile per slot
    capacity = max_tiles(num_tokens, num_slots, tile_tokens)
    tile_ids = torch.arange(capacity, device=device)
    tile_slot = torch.searchsorted(tile_ends, tile_ids, right=True)
    in_use = tile_slot < num_slots
    tile_slot = tile_slot.clamp(max=num_slots - 1)
    first_tile = tile_ends[tile_slot] - tiles_per_slot[tile_slot]
    tile_start = segment_starts[tile_slot] + (tile_ids - first_tile) * tile_tokens
    tile_len = (segment_ends[tile_slot] - tile_start).clamp(0, tile_tokens)
    tile_len = torch.where(in_use, tile_len, 0)
    tile_start = torch.where(in_use, tile_start, 0)
    return LoraSegments(
        token_slots=token_slots.to(torch.int32),
        sorted_tokens=order.to(torch.int32),
        segment_starts=torch.cat([segment_starts, segment_ends[-1:]]).to(torch.int32),
        segment_slots=torch.arange(num_slots, dtype=torch.int32, device=device),
        tile_starts=tile_start.to(torch.int32),
        tile_lens=tile_len.to(torch.int32),
        tile_slots=tile_slot.to(torch.int32),
        split_counters=torch.zeros(
            capacity * COUNTERS_PER_TILE, dtype=torch.int32, device=device
        ),
        num_lora_tokens=num_tokens,
        num_segments=num_slots,
        num_tiles=capacity,
        tile_tokens=tile_tokens,
        max_tile_len=tile_tokens,
    )
