"""prepare_inputs: one step's ScheduledBatch (host ints) → ForwardInputs (tensors on the device).

The integer tensors of the step are packed into one host tensor and copied to the device in one
transfer (the LoRA segment metadata in one more); both are built here once and shared by every
layer. Nothing here waits for the device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from loraplex.kernels.sgmv import LoraSegments, build_segments

from .batch import ScheduledBatch


@dataclass(frozen=True)
class ForwardInputs:
    """What the model reads in one step, for a flat batch of T tokens from S sequences."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, KV-cache row of each token
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with 0
    query_start_loc: (
        torch.Tensor
    )  # [S + 1] int32, first token of each sequence in the batch
    seq_lens: torch.Tensor  # [S] int32, context length of each sequence after this step
    logits_indices: (
        torch.Tensor
    )  # [num_sampling] int64, last token of each sampling sequence
    lora: LoraSegments | None  # None when LoRA is off
    max_query_len: int = 1  # host int: the longest sequence of new tokens in this step
    max_seq_len: int = 1  # host int: the longest context after this step


def prepare_inputs(
    batch: ScheduledBatch, block_size: int, device: torch.device, lora_enabled: bool
) -> ForwardInputs:
    """Lay the batch out flat, sequence after sequence, in the scheduler's order."""
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    starts = [0]
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    token_slots: list[int] = []
    max_blocks = max(len(seq.block_ids) for seq in batch.sequences)
    tables: list[int] = []
    for seq in batch.sequences:
        input_ids.extend(seq.token_ids)
        span = range(seq.start, seq.start + seq.num_new_tokens)
        positions.extend(span)
        slot_mapping.extend(
            seq.block_ids[p // block_size] * block_size + p % block_size for p in span
        )
        starts.append(starts[-1] + seq.num_new_tokens)
        seq_lens.append(seq.start + seq.num_new_tokens)
        if seq.samples:
            logits_indices.append(starts[-1] - 1)
        slot = seq.request.slot
        token_slots.extend([-1 if slot is None else slot] * seq.num_new_tokens)
        tables.extend(seq.block_ids)
        tables.extend([0] * (max_blocks - len(seq.block_ids)))

    host = torch.tensor(
        [
            *input_ids,
            *positions,
            *slot_mapping,
            *logits_indices,
            *tables,
            *starts,
            *seq_lens,
        ],
        dtype=torch.int64,
    )
    if device.type == "cuda":
        host = host.pin_memory()
    packed = host.to(device, non_blocking=True)
    t, s, n = len(input_ids), len(seq_lens), len(logits_indices)
    cuts = [
        0,
        t,
        2 * t,
        3 * t,
        3 * t + n,
        3 * t + n + s * max_blocks,
        3 * t + n + s * max_blocks + s + 1,
    ]
    part = [packed[a:b] for a, b in itertools.pairwise(cuts)]
    tail = packed[cuts[-1] :]
    return ForwardInputs(
        input_ids=part[0],
        positions=part[1],
        slot_mapping=part[2],
        logits_indices=part[3],
        block_tables=part[4].view(s, max_blocks).to(torch.int32),
        query_start_loc=part[5].to(torch.int32),
        seq_lens=tail.to(torch.int32),
        lora=build_segments(token_slots, device) if lora_enabled else None,
        max_query_len=max(seq.num_new_tokens for seq in batch.sequences),
        max_seq_len=max(seq_lens),
    )
