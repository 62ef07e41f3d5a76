"""Scheduler priorities: a waiting request of a better (lower) priority goes ahead of the
running requests of a worse one, and blocks are taken back from the worst priority first."""

from __future__ import annotations

import time

from test_scheduler import make_request, step

from loraplex.platform.blocks import BlockManager
from loraplex.platform.request import FinishReason
from loraplex.platform.scheduler import Scheduler


def shares(batch) -> list[tuple[str, int]]:
    return [(s.request.request_id, s.num_new_tokens) for s in batch.sequences]


def with_priority(rid: str, prompt_len: int, priority: int, max_tokens: int = 4):
    request = make_request(rid, prompt_len, max_tokens)
    request.priority = priority
    return request


def test_a_better_priority_prompt_goes_ahead_of_a_worse_running_prefill():
    scheduler = Scheduler(
        BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10
    )
    scheduler.add(with_priority("flood-decode", 2, 1, max_tokens=8))
    scheduler.add(with_priority("flood-long", 40, 1))
    step(scheduler)  # flood-decode's prompt and 8 tokens of flood-long's
    steady = with_priority("steady", 6, 0)
    scheduler.add(steady)
    batch, _ = step(scheduler)
    # Without priorities the running requests take the budget first (1 + 9), and
    # steady waits a step. With steady's prompt in the step, flood-long's prompt waits:
    # steady's first token comes from a step as short as without the flood.
    assert shares(batch) == [("steady", 6), ("flood-decode", 1)]
    batch, _ = step(
        scheduler
    )  # steady decodes: the worse prompt gets a quarter (2 of 10)
    assert shares(batch) == [("steady", 1), ("flood-decode", 1), ("flood-long", 2)]
    scheduler.finish(steady, FinishReason.ABORT)
    batch, _ = step(scheduler)  # priority 1 is the best now: the whole budget
    assert shares(batch) == [("flood-decode", 1), ("flood-long", 9)]


def test_equal_priorities_keep_running_first_then_first_come_first_served():
    scheduler = Scheduler(
        BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10
    )
    scheduler.add(with_priority("a", 2, 1, max_tokens=8))
    scheduler.add(with_priority("b", 40, 1))
    step(scheduler)
    scheduler.add(with_priority("c", 6, 1))
    batch, _ = step(scheduler)
    assert shares(batch) == [("a", 1), ("b", 9)]


def test_add_queues_by_priority_ahead_of_yielded_and_worse_requests():
    scheduler = Scheduler(
        BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=64
    )
    scheduler.add(with_priority("running", 4, 1, max_tokens=16))
    step(scheduler)
    for rid, priority in (("w1", 1), ("w0", 0), ("w2", 2), ("w0b", 0)):
        scheduler.add(with_priority(rid, 4, priority))
    assert [r.request_id for r in scheduler.waiting] == ["w0", "w0b", "w1", "w2"]
    assert scheduler.preempt("running")  # gives its place: last of priority 1
    scheduler.add(with_priority("w1b", 4, 1))
    assert [r.request_id for r in scheduler.waiting] == [
        "w0",
        "w0b",
        "w1",
        "w1b",
        "running",
        "w2",
    ]
    assert not scheduler.preempt(
        "w0"
    )  # a waiting one: last of its priority, not of all
    assert [r.request_id for r in scheduler.waiting][:3] == ["w0b", "w0", "w1"]


def test_blocks_are_taken_back_from_the_worst_priority_first():
    # 4 blocks of 4 tokens, two each; "flood" (priority 1) started first.
    scheduler = Scheduler(BlockManager(4, 4), max_num_seqs=4, max_num_batched_tokens=64)
    scheduler.add(with_priority("flood", 6, 1, max_tokens=8))
    step(scheduler)
    scheduler.add(with_priority("steady", 8, 0, max_tokens=8))
    batch, _ = step(scheduler)
    assert shares(batch) == [("steady", 8), ("flood", 1)]
    # "steady" needs a third block: without priorities it would give its own (the newest
    # running); the priority-1 request gives its blocks instead.
    batch, _ = step(scheduler)
    assert batch.preempted == ("flood",)
    assert shares(batch) == [("steady", 1)]
    assert [r.request_id for r in scheduler.waiting] == ["flood"]


def test_queue_and_prefill_times_are_stamped_once():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=4)
    first = with_priority("first", 6, 0)
    second = with_priority("second", 2, 0)
    for request in (first, second):
        request.queued_at = time.monotonic()
        scheduler.add(request)
    step(scheduler)  # 4 of first's 6 prompt tokens: scheduled, no token yet
    assert first.scheduled_at >= first.queued_at and first.first_token_at is None
    assert second.scheduled_at is None  # no place: it is still queued
    scheduled = first.scheduled_at
    step(scheduler)
    assert first.first_token_at >= scheduled
    assert scheduler.preempt(
        "first"
    )  # recomputed later: the stamps stay the first ones
    step(scheduler)
    assert first.scheduled_at == scheduled and second.scheduled_at is not None
