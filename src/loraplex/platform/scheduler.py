"""Scheduler: in-flight batching under a per-step token budget. No torch here.

There are no prefill and decode phases. Each request has `num_computed_tokens`, which catches up
with its `num_tokens` (prompt + output) under the step's token budget: a decode needs one token, a
prefill in progress takes what the budget leaves, so prefill chunks and decodes share a step.

    schedule():
      1. running requests, oldest first: each gets min(tokens left, budget left); when the KV
         cache has no block for them, the newest running request is preempted (its blocks freed,
         its tokens recomputed later) until they fit;
      2. waiting requests, first come first served (preempted ones at the front), while the
         budget, max_num_seqs and free blocks allow, each possibly as a partial (chunked) prefill.
    update(batch, sampled): advance num_computed_tokens, append sampled tokens, finish requests.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .batch import ScheduledBatch, ScheduledSequence
from .blocks import BlockManager
from .request import FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class RequestUpdate:
    """What one step did to one request: the token it sampled and whether it has finished."""

    request: Request
    new_token_id: int | None
    finish_reason: FinishReason | None
    sample_index: int | None  # row of the sampler output this request used


class Scheduler:
    """Decides, each step, which requests run and how many of their tokens are computed."""

    def __init__(
        self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int
    ):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[str] = []
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            target = request.num_computed_tokens + num_new
            while not self.blocks.can_allocate(request.request_id, target):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break  # the request itself was the newest: it waits for blocks to come back
            scheduled.append(self._schedule(request, num_new))
            budget -= num_new
            index += 1

        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.max_num_seqs:
                break
            request = self.waiting[0]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.blocks.can_allocate(
                request.request_id, request.num_computed_tokens + num_new
            ):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._schedule(request, num_new))
            budget -= num_new
        return ScheduledBatch(sequences=tuple(scheduled), preempted=tuple(preempted))

    def _schedule(self, request: Request, num_new: int) -> ScheduledSequence:
        start = request.num_computed_tokens
        table = self.blocks.allocate(request.request_id, start + num_new)
        samples = start + num_new == request.num_tokens
        return ScheduledSequence(request, start, num_new, tuple(table), samples)

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks and put it back at the head of the queue to recompute."""
        self.running.remove(request)
        self.blocks.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(
        self, batch: ScheduledBatch, sampled_token_ids: list[int]
    ) -> list[RequestUpdate]:
        """Advance the requests of `batch`; `sampled_token_ids` has one entry per sampling sequence."""
        updates = []
        sample_index = 0
        for seq in batch.sequences:
            request = seq.request
            request.num_computed_tokens = seq.start + seq.num_new_tokens
            if not seq.samples:
                continue
            token = sampled_token_ids[sample_index]
            request.output_token_ids.append(token)
            reason = request.check_finished()
            updates.append(RequestUpdate(request, token, reason, sample_index))
            sample_index += 1
            if reason is not None:
                self.finish(request, reason)
        return updates

    def finish(self, request: Request, reason: FinishReason) -> None:
        """End a request (finished, stopped by a stop string, or aborted) and free its blocks."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        else:
            return
        self.blocks.free(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
