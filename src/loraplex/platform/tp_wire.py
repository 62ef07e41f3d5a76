"""What rank 0 sends the other tensor-parallel ranks: each step's batch and adapter shards, as
flat tensors (never pickles).

A step travels as one int64 tensor: the number of sequences, then per sequence
`start, num_new_tokens, samples, slot (-1: base), num_blocks`, its new token ids and its block
ids. The receiving rank rebuilds a ScheduledBatch whose requests know only their slot and these
tokens: all the model runner reads.
An adapter shard travels as an int64 description of its modules, their float64 scales and one
float32 buffer of A and B values (exact for bf16, fp16 and fp32 adapters).
"""

from __future__ import annotations

import torch

from .batch import ScheduledBatch, ScheduledSequence
from .config import LORA_TARGETS
from .lora_slots import LoraModuleWeights, LoraWeights


def pack_batch(batch: ScheduledBatch) -> torch.Tensor:
    """One step's batch → [n] int64."""
    values = [len(batch.sequences)]
    for seq in batch.sequences:
        slot = -1 if seq.request.slot is None else seq.request.slot
        values += [seq.start, seq.num_new_tokens, int(seq.samples), slot]
        values.append(len(seq.block_ids))
        values += seq.token_ids
        values += seq.block_ids
    return torch.tensor(values, dtype=torch.int64)


class _WireRequest:
    """The part of a Request a model runner reads: its slot and the step's tokens."""

    def __init__(self, slot: int | None, start: int, tokens: list[int]) -> None:
        self.slot = slot
        self._start = start
        self._tokens = tokens

    def token_ids(self, start: int, stop: int) -> list[int]:
        return self._tokens[start - self._start : stop - self._start]


def unpack_batch(packed: torch.Tensor) -> ScheduledBatch:
    """The inverse of `pack_batch`."""
    values = packed.tolist()
    sequences, at = [], 1
    for _ in range(values[0]):
        start, num_new, samples, slot, num_blocks = values[at : at + 5]
        at += 5
        tokens = values[at : at + num_new]
        at += num_new
        blocks = tuple(values[at : at + num_blocks])
        at += num_blocks
        request = _WireRequest(None if slot < 0 else slot, start, tokens)
        sequences.append(
            ScheduledSequence(request, start, num_new, blocks, bool(samples))
        )
    return ScheduledBatch(tuple(sequences))


def pack_adapter(
    weights: LoraWeights,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(description [n, 6] int64, scales [n] float64, values [m] float32) of an adapter."""
    rows, scales, values = [], [], []
    for (layer, target), module in sorted(weights.modules.items()):
        a, b = module.lora_a, module.lora_b
        rows.append([layer, LORA_TARGETS.index(target), *a.shape, *b.shape])
        scales.append(module.scale)
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
