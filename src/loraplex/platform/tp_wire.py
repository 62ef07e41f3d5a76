"""What rank 0 sends the other tensor-parallel ranks: each step's batch and adapter shards, as
flat tensors (never pickles).

A step travels as one int64 tensor: the number of sequences, then per sequence a header
`wire_id, start, num_new_tokens, samples, slot (-1: base), kept, num_blocks`, its new token ids
and `num_blocks` block ids. Block tables travel incrementally, as vLLM's scheduler output sends
them: a worker keeps the table it last received for each request of the previous step (by
wire id), and a step sends only the blocks appended since (`kept` leading blocks are reused), so
a steady decode sends no block ids at all. Both ends forget the requests a step does not
schedule, by the same rule, so a request that comes back is sent whole under a new wire id.
The receiving rank rebuilds a ScheduledBatch whose requests know only their slot and these
tokens: all the model runner reads.
An adapter shard travels as an int64 description of its modules, their float64 scales and one
float32 buffer of A and B values (exact for bf16, fp16 and fp32 adapters).
"""

from __future__ import annotations

import numpy as np
import torch

from .batch import ScheduledBatch, ScheduledSequence
from .config import LORA_TARGETS
from .lora_slots import LoraModuleWeights, LoraWeights

_HEADER = 7  # ints per sequence before its tokens and blocks


class BatchSender:
    """Rank 0's end of the step wire: what the workers hold of each scheduled request."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[int, tuple[int, ...]]] = {}  # id → (wire id, table)
        self._next_wire_id = 0

    def pack(self, batch: ScheduledBatch) -> torch.Tensor:
        """One step's batch → [n] int64, block tables as what changed since the last step."""
        values = [len(batch.sequences)]
        held, now = self._held, {}
        for request, start, num_new, table, samples in batch.sequences:
            entry = held.get(request.request_id)
            if entry is None:
                wire_id, kept = self._next_wire_id, 0
                self._next_wire_id += 1
            else:
                wire_id, before = entry
                grew = table is before or table[: len(before)] == before
                kept = len(before) if grew else 0
            slot = -1 if request.slot is None else request.slot
            values += (wire_id, start, num_new, samples, slot, kept, len(table) - kept)
            values += request.token_ids(start, start + num_new)
            values += table[kept:]
            now[request.request_id] = (wire_id, table)
        self._held = now
        return torch.from_numpy(np.array(values, dtype=np.int64))


class BatchReceiver:
    """A worker's end of the step wire: the block table of each request of the last step."""

    def __init__(self) -> None:
        self._tables: dict[int, tuple[int, ...]] = {}  # wire id → table

    def unpack(self, packed: torch.Tensor) -> ScheduledBatch:
        """The inverse of `BatchSender.pack`, given every earlier step in order."""
        values = packed.tolist()
        held, now = self._tables, {}
        sequences, at = [], 1
        for _ in range(values[0]):
            wire_id, start, num_new, samples, slot, kept, num_blocks = values[
                at : at + _HEADER
            ]
            at += _HEADER
            tokens = values[at : at + num_new]
            at += num_new
            # An unchanged table is the held tuple itself (a whole slice of a tuple is the
            # tuple), which lets DecodeGraphs._fill skip its row by identity.
            table = held[wire_id][:kept] if kept else ()
            if num_blocks:
                table += tuple(values[at : at + num_blocks])
                at += num_blocks
            now[wire_id] = table
            request = _WireRequest(None if slot < 0 else slot, start, tokens)
            sequences.append(
                ScheduledSequence(request, start, num_new, table, bool(samples))
            )
        self._tables = now
        return ScheduledBatch(tuple(sequences))


def pack_batch(batch: ScheduledBatch) -> torch.Tensor:
    """One step's batch → [n] int64, whole (as to a worker that holds nothing yet)."""
    return BatchSender().pack(batch)


def unpack_batch(packed: torch.Tensor) -> ScheduledBatch:
    """The inverse of `pack_batch`."""
    return BatchReceiver().unpack(packed)


class _WireRequest:
    """The part of a Request a model runner reads: its slot and the step's tokens."""

    __slots__ = ("_start", "_tokens", "slot")

    def __init__(self, slot: int | None, start: int, tokens: list[int]) -> None:
        self.slot = slot
        self._start = start
        self._tokens = tokens

    def token_ids(self, start: int, stop: int) -> list[int]:
        return self._tokens[start - self._start : stop - self._start]

    def token_at(self, position: int) -> int:
        return self._tokens[position - self._start]


def pack_adapter(
    weights: LoraWeights,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(description [n, 6] int64, scales [n] float64, values [m] float32) of an adapter."""
    rows, scales, values = [], [], []
    for (layer, target), module in sorted(weights.modules.items()):
        a, b = module.lora_a, module.lora_b
        rows.append([layer, LORA_TARGETS.index(target), *a.shape, *b.shape])
        scales.append(module.scale)
        # reshape, not view: B may be an [out, rank] view of rank-major storage,
        # and the wire carries it in its logical order, [out, rank] row by row.
        values += [a.reshape(-1).float(), b.reshape(-1).float()]
    description = torch.tensor(rows, dtype=torch.int64).reshape(-1, 6)
    flat = torch.cat(values) if values else torch.zeros(0)
    return description, torch.tensor(scales, dtype=torch.float64), flat


def unpack_adapter(
    description: torch.Tensor, scales: torch.Tensor, values: torch.Tensor
) -> LoraWeights:
    """The inverse of `pack_adapter` (tensors in float32)."""
    modules, at = {}, 0
    for row, scale in zip(description.tolist(), scales.tolist(), strict=True):
        layer, target, a_rows, a_cols, b_rows, b_cols = row
        a = values[at : at + a_rows * a_cols].view(a_rows, a_cols)
        at += a_rows * a_cols
        b = values[at : at + b_rows * b_cols].view(b_rows, b_cols)
        at += b_rows * b_cols
        modules[(layer, LORA_TARGETS[target])] = LoraModuleWeights(a, b, scale)
    return LoraWeights(modules)
