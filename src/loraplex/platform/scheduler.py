"""Scheduler: in-flight batching under a per-step token budget. No torch here.

There are no prefill and decode phases. Each request has `num_computed_tokens`, which catches up
with its `num_tokens` (prompt + output) under the step's token budget: a decode needs one token, a
prefill in progress takes what the budget leaves, so prefill chunks and decodes share a step.

    schedule():
      1. running requests, oldest first: each gets min(tokens left, budget left); when the KV
         cache has no block for them, the newest running request is preempted (its blocks freed,
         its tokens recomputed later) until they fit;
      2. waiting requests, first come first served (preempted ones at the front; those that
         gave their place through preempt() at the back, behind requests added since), while the
         budget, max_num_seqs and free blocks allow, each possibly as a partial (chunked) prefill.
      Requests carry a priority (lower first; the API gives tenants under their fair share 0):
      a waiting request goes ahead of the running requests of a worse priority, which take
      what budget it leaves, and blocks are taken back from the worst priority first. While
      the best priority has requests, the prompts of worse ones share a quarter of the budget
      a step, and nothing in a step that computes a prompt of the best priority (decodes are
      not limited), so that steps stay short for the better priority's first tokens. With one
      priority, as a rule, this is the order above.
         With prefix caching, a request first takes the longest cached run of full blocks of its
         tokens (never all of them: the last token is computed, for its logits) and starts its
         num_computed_tokens there; cached tokens cost no budget.
    update(batch, sampled): advance num_computed_tokens, index the blocks that became full and
      computed (prefill chunks and decodes alike), append sampled tokens, finish requests.
    preempt(request_id), between steps: a request gives its place to the requests waiting
      and to those added later (fairness between tenants, decided by the API's admission).
"""

from __future__ import annotations

import math
import time
from collections import deque
from operator import attrgetter
from typing import NamedTuple

from .batch import ScheduledBatch, ScheduledSequence
from .blocks import BlockManager
from .prefix_cache import PrefixCacheStats, block_hash
from .request import FinishReason, Request, RequestStatus


class RequestUpdate(NamedTuple):
    """What one step did to one request: the token it sampled and whether it has finished.

    A NamedTuple, as ScheduledSequence: one per sampling request per step.
    """

    request: Request
    new_token_id: int | None
    finish_reason: FinishReason | None
    sample_index: int | None  # row of the sampler output this request used


# While the best priority has requests, worse priorities' prompts get 1/this of a step's budget,
# and none in a step that computes a prompt of the best priority: that prompt's step (its time
# to first token) is then as long as it would be without them (issue 8's fairness).
WORSE_PROMPT_SHARE = 4


class _Step:
    """The batch being built: its sequences, the requests preempted for blocks, the budget,
    and what is left of the share of prompt tokens of priorities worse than `best`."""

    def __init__(self, budget: int, best: float, worse_prompt_tokens: int) -> None:
        self.budget = budget
        self.best = best
        self.worse_prompt_tokens = worse_prompt_tokens
        self.scheduled: list[ScheduledSequence] = []
        self.preempted: list[str] = []

    def grant(self, request: Request, wanted: int) -> int:
        """How many of `wanted` tokens `request` may compute in this step."""
        num_new = min(wanted, self.budget)
        if num_new > 1 and request.priority > self.best:
            num_new = min(num_new, self.worse_prompt_tokens)
        return num_new

    def add(self, sequence: ScheduledSequence) -> None:
        self.scheduled.append(sequence)
        self.budget -= sequence.num_new_tokens
        if sequence.num_new_tokens > 1:
            if sequence.request.priority > self.best:
                self.worse_prompt_tokens -= sequence.num_new_tokens
            else:  # the best priority's prompt: worse ones wait for a step without one
                self.worse_prompt_tokens = 0


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
        self.prefix_cache = PrefixCacheStats()
        self.yielded: set[str] = set()  # waiting, last, since they gave their place

    def add(self, request: Request) -> None:
        """Queue a request, behind those of its priority or better, ahead of those of its
        priority that gave their place (preempt) and of every worse priority."""
        request.status = RequestStatus.WAITING
        waiting, at = self.waiting, len(self.waiting)
        while at and (
            waiting[at - 1].priority > request.priority
            or waiting[at - 1].request_id in self.yielded
        ):
            at -= 1
        waiting.insert(at, request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """The requests of the next step and how many tokens of each (the module's rules)."""
        # Stable: oldest first within a priority; blocks are taken back from the end.
        order = sorted(self.running, key=attrgetter("priority"))
        best = min(
            order[0].priority if order else math.inf,
            self.waiting[0].priority if self.waiting else math.inf,
        )
        budget = self.max_num_batched_tokens
        step = _Step(budget, best, budget // WORSE_PROMPT_SHARE)
        pos = 0
        # No new request once one did not fit, or blocks were taken back.
        admitting = True
        while step.budget > 0:
            room = admitting and self.waiting and len(self.running) < self.max_num_seqs
            head = self.waiting[0] if room else None
            if pos < len(order) and (
                head is None or order[pos].priority <= head.priority
            ):
                if not self._schedule_running(order, pos, step):
                    break  # the request itself gave its blocks back: it waits for blocks
                admitting = admitting and not step.preempted
                pos += 1
            elif head is not None:
                admitting = self._admit(head, step)
            else:
                break
        return ScheduledBatch(
            sequences=tuple(step.scheduled), preempted=tuple(step.preempted)
        )

    def _schedule_running(self, order: list[Request], pos: int, step: _Step) -> bool:
        """Schedule `order[pos]`, taking blocks back from the end of `order` (worst priority,
        newest) while they are short; False when it was itself the one to give them."""
        request = order[pos]
        start = request.num_computed_tokens
        num_new = step.grant(request, request.num_tokens - start)
        if num_new == 0:
            return True  # a worse priority's prompt, past its share: not in this step
        table = self.blocks.try_allocate(request.request_id, start + num_new)
        while (
            table is None
        ):  # no blocks left: the last unscheduled request gives its own
            victim = order.pop()
            self._preempt(victim)
            step.preempted.append(victim.request_id)
            if victim is request:
                return False
            table = self.blocks.try_allocate(request.request_id, start + num_new)
        step.add(
            ScheduledSequence(
                request, start, num_new, table, start + num_new == request.num_tokens
            )
        )
        return True

    def _admit(self, request: Request, step: _Step) -> bool:
        """Start the first waiting request if its blocks fit; whether it did."""
        assert request.num_computed_tokens == 0, "waiting requests hold no KV"
        cached = self._find_cached(request)
        start = len(cached) * self.blocks.block_size
        num_new = step.grant(request, request.num_tokens - start)
        if num_new == 0 or not self.blocks.can_allocate(
            request.request_id, start + num_new, cached
        ):
            return False
        self.waiting.popleft()
        self.yielded.discard(request.request_id)
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = start
        if request.scheduled_at is None:
            request.scheduled_at = time.monotonic()
        if request.cache_root is not None and request.num_preemptions == 0:
            request.num_cached_tokens = start
            self.prefix_cache.record(request.num_tokens, start)
        self.running.append(request)
        table = self.blocks.try_allocate(request.request_id, start + num_new, cached)
        assert table is not None, "can_allocate said it fits"
        step.add(
            ScheduledSequence(
                request, start, num_new, table, start + num_new == request.num_tokens
            )
        )
        return True

    def _find_cached(self, request: Request) -> list[int]:
        """The cached blocks a waiting request (which holds none) can start from."""
        if request.cache_root is None or not self.blocks.enable_caching:
            return []
        # At least the last token is computed, so that the step yields its logits.
        usable = (request.num_tokens - 1) // self.blocks.block_size
        return self.blocks.find_cached(self._block_hashes(request, usable), usable)

    def _block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """The request's chain hashes, extended to at least `num_blocks` full blocks; each block
        is hashed once in the request's life."""
        hashes, size = request.block_hashes, self.blocks.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else request.cache_root
            hashes.append(
                block_hash(parent, request.token_ids(i * size, (i + 1) * size))
            )
        return hashes

    def preempt(self, request_id: str) -> bool:
        """Give a request's place to the requests waiting and to those added later: a
        running one frees its blocks (its tokens are recomputed later; its full blocks stay
        in the prefix cache) and queues last; a waiting one moves to the end of the queue.
        Whether a running request was preempted (False for a waiting, finished or unknown
        one)."""
        running = next((r for r in self.running if r.request_id == request_id), None)
        waiting = next((r for r in self.waiting if r.request_id == request_id), None)
        if running is not None:
            self._preempt(running, last=True)
        elif waiting is not None:  # to the end of its priority
            self.waiting.remove(waiting)
            self._queue(waiting, last=True)
        else:
            return False
        self.yielded.add(request_id)
        return running is not None

    def _preempt(self, request: Request, last: bool = False) -> None:
        """Free the request's blocks and queue it again to recompute: first in line (it was
        preempted for blocks), or `last` (it gave its place to others)."""
        self.running.remove(request)
        self.blocks.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._queue(request, last)

    def _queue(self, request: Request, last: bool) -> None:
        """Queue a request at the end (`last`) or the front of its priority."""
        waiting, priority = self.waiting, request.priority
        if last:  # the end of its priority
            at = len(waiting)
            while at and waiting[at - 1].priority > priority:
                at -= 1
        else:  # the front of its priority
            at = 0
            while at < len(waiting) and waiting[at].priority < priority:
                at += 1
        waiting.insert(at, request)

    def update(
        self, batch: ScheduledBatch, sampled_token_ids: list[int]
    ) -> list[RequestUpdate]:
        """Advance the requests of `batch`; `sampled_token_ids` has one entry per sampling sequence."""
        updates = []
        sample_index = 0
        blocks = self.blocks
        caching, block_size = blocks.enable_caching, blocks.block_size
        now = time.monotonic()
        for request, start, num_new, _, samples in batch.sequences:
            computed = request.num_computed_tokens = start + num_new
            if caching and request.cache_root is not None:
                full = computed // block_size
                if full > blocks.num_indexed(request.request_id):  # a block was filled
                    hashes = self._block_hashes(request, full)
                    blocks.cache_blocks(
                        request.request_id, request.cache_root, hashes, full
                    )
            if not samples:
                continue
            token = sampled_token_ids[sample_index]
            if not request.output_token_ids:
                request.first_token_at = now
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
        self.yielded.discard(request.request_id)
        self.blocks.free(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
