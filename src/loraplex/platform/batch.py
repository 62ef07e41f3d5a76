"""ScheduledBatch: the scheduler → model-runner contract for one step. No torch here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .request import Request


class ScheduledSequence(NamedTuple):
    """One request's share of a step: positions start:start+num_new_tokens are computed.

    A NamedTuple rather than a frozen dataclass: one is built per running request per step,
    and a frozen dataclass's __init__ costs about three times as much.
    """

    request: Request
    start: int  # num_computed_tokens before this step
    num_new_tokens: int
    block_ids: tuple[int, ...]  # the request's whole block table after allocation
    samples: bool  # this step reaches the end of the known tokens, so a next token is sampled

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_ids(self.start, self.start + self.num_new_tokens)


@dataclass(frozen=True)
class ScheduledBatch:
    """The sequences of one step in batch order, and the requests preempted to make room."""

    sequences: tuple[ScheduledSequence, ...]
    preempted: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.sequences

    @property
    def num_tokens(self) -> int:
        return sum(seq.num_new_tokens for seq in self.sequences)

    @property
    def sampling_sequences(self) -> list[ScheduledSequence]:
        return [seq for seq in self.sequences if seq.samples]
