"""prepare_inputs: one step's ScheduledBatch (host ints) → ForwardInputs (tensors on the device).

The integer tensors of the step are packed into one host tensor and copied to the device in one
transfer (the LoRA segment metadata in one more); both are built here once and shared by every
layer. Nothing here waits for the device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
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
    """Lay the batch out flat, sequence after sequence, in the scheduler's order.

    One pass over the sequences gathers their host ints; per-token columns (positions, KV-cache
    rows, slots) are then derived with numpy, not built token by token in Python.
    """
    seqs = batch.sequences
    num_seqs = len(seqs)
    max_blocks = max(len(seq.block_ids) for seq in seqs)
    padding = (0,) * max_blocks
    tables = np.array(  # [num_seqs, max_blocks], padded with 0
        [seq.block_ids + padding[len(seq.block_ids) :] for seq in seqs], dtype=np.int64
    )
    starts, counts, samples, slots = np.array(
        [
            (seq.start, seq.num_new_tokens, seq.samples, _slot(seq.request.slot))
            for seq in seqs
        ],
        dtype=np.int64,
    ).T
    input_ids = np.fromiter(
        itertools.chain.from_iterable(seq.token_ids for seq in seqs), dtype=np.int64
    )
    # Array methods rather than np.* functions: these arrays are small, and the functions'
    # dispatch costs more than the work.
    ends = counts.cumsum()  # one past each sequence's last token in the batch
    owner = np.arange(num_seqs).repeat(counts)  # the sequence of each token
    positions = np.arange(len(input_ids)) + (starts - ends + counts)[owner]
    slot_mapping = (
        tables[owner, positions // block_size] * block_size + positions % block_size
    )
    logits_indices = ends[samples.astype(bool)] - 1
    seq_lens = starts + counts
    host = np.concatenate(
        [
            input_ids,
            positions,
            slot_mapping,
            logits_indices,
            tables.reshape(-1),
            [0],
            ends,
            seq_lens,
        ]
    )
    packed = torch.from_numpy(host)
    if device.type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    t, s, n = len(input_ids), num_seqs, len(logits_indices)
    cuts = list(itertools.accumulate((0, t, t, t, n, s * max_blocks, s + 1)))
    part = [packed[a:b] for a, b in itertools.pairwise(cuts)]
    tail = packed[cuts[-1] :]
    token_slots = slots.repeat(counts).tolist()
    return ForwardInputs(
        input_ids=part[0],
        positions=part[1],
        slot_mapping=part[2],
        logits_indices=part[3],
        block_tables=part[4].view(s, max_blocks).to(torch.int32),
        query_start_loc=part[5].to(torch.int32),
        seq_lens=tail.to(torch.int32),
        lora=build_segments(token_slots, device) if lora_enabled else None,
        max_query_len=max(counts.tolist()),
        max_seq_len=max(seq_lens.tolist()),
    )


def _slot(slot: int | None) -> int:
    return -1 if slot is None else slot
