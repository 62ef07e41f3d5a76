"""Segment metadata: the tokens of one step grouped by adapter slot, built once on the host.

Every LoRA linear of every layer in a step reads the same metadata, so it is built once per step
from the scheduler's host ints and copied to the device in one transfer; nothing in a kernel
launch reads it back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraSegments:
    """Which tokens of a flat batch use which adapter slot.

    A segment is the run of tokens (in `sorted_tokens` order) that share one slot; tokens of
    base-only requests (slot -1) belong to no segment.
    """

    token_slots: torch.Tensor  # [num_tokens] int32, -1 = base model only
    sorted_tokens: (
        torch.Tensor
    )  # [num_lora_tokens] int32, token indices grouped by ascending slot
    segment_starts: torch.Tensor  # [num_segments + 1] int32, offsets into sorted_tokens
    segment_slots: torch.Tensor  # [num_segments] int32, the slot of each segment
    num_lora_tokens: int  # host copy: tokens that belong to some segment
    num_segments: int  # host copy: distinct slots present in the batch

    @property
    def has_lora(self) -> bool:
        """False when every token of the batch is base-only: LoRA work can be skipped entirely."""
        return self.num_lora_tokens > 0


def build_segments(
    token_slots: Sequence[int], device: torch.device | str = "cpu"
) -> LoraSegments:
    """Group the tokens of one step by slot, from host ints, with one host→device copy.

    :param token_slots: the slot of each token in batch order, -1 for base-only tokens.
    :param device: where the kernels will read the metadata.
    """
    by_slot: dict[int, list[int]] = {}
    for token, slot in enumerate(token_slots):
        if slot >= 0:
            by_slot.setdefault(slot, []).append(token)
    slots = sorted(by_slot)
    sorted_tokens: list[int] = []
    starts = [0]
    for slot in slots:
        sorted_tokens.extend(by_slot[slot])
        starts.append(len(sorted_tokens))
    num_tokens = len(token_slots)
    host = torch.tensor(
        [*token_slots, *sorted_tokens, *starts, *slots],
        dtype=torch.int32,
        pin_memory=False,
    )
    packed = host.to(device, non_blocking=True)
    a, b, c = (
        num_tokens,
        num_tokens + len(sorted_tokens),
        num_tokens + len(sorted_tokens) + len(starts),
    )
    return LoraSegments(
        token_slots=packed[:a],
        sorted_tokens=packed[a:b],
        segment_starts=packed[b:c],
        segment_slots=packed[c:],
        num_lora_tokens=len(sorted_tokens),
        num_segments=len(slots),
    )
