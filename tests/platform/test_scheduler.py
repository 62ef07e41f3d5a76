"""Scheduler and BlockManager: pure Python, driven with made-up sampled tokens."""

from __future__ import annotations

import pytest

from loraplex.platform.blocks import BlockManager
from loraplex.platform.request import (
    FinishReason,
    Request,
    RequestStatus,
    SamplingParams,
)
from loraplex.platform.scheduler import Scheduler


def make_request(rid: str, prompt_len: int, max_tokens: int = 4, **sampling) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling)
    return Request(
        rid,
        list(range(1, prompt_len + 1)),
        params,
        seed=0,
        eos_token_ids=frozenset({0}),
    )


def step(scheduler: Scheduler, token: int = 7):
    batch = scheduler.schedule()
    sampled = [token] * len(batch.sampling_sequences)
    return batch, scheduler.update(batch, sampled)


def test_block_manager_allocates_frees_and_counts():
    blocks = BlockManager(num_blocks=4, block_size=4)
    assert blocks.blocks_needed("a", 9) == 3
    table = blocks.allocate("a", 9)
    assert len(table) == 3 and blocks.num_free_blocks == 1
    assert blocks.allocate("a", 12) == table  # still fits in 3 blocks
    assert not blocks.can_allocate("b", 5)
    with pytest.raises(MemoryError):
        blocks.allocate("b", 5)
    blocks.free("a")
    assert blocks.num_free_blocks == 4 and blocks.block_table("a") == []


def test_token_budget_chunks_prefill_and_mixes_it_with_decodes():
    scheduler = Scheduler(
        BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10
    )
    scheduler.add(make_request("short", 3))
    scheduler.add(make_request("long", 25))
    batch, _ = step(scheduler)
    assert [(s.request.request_id, s.num_new_tokens) for s in batch.sequences] == [
        ("short", 3),
        ("long", 7),
    ]
    assert [s.request.request_id for s in batch.sampling_sequences] == ["short"]
    batch, _ = step(
        scheduler
    )  # one decode for "short", the rest of the budget for "long"
    assert [(s.request.request_id, s.num_new_tokens) for s in batch.sequences] == [
        ("short", 1),
        ("long", 9),
    ]
    assert all(b.num_tokens <= 10 for b in [batch])
    batch, _ = step(scheduler)
    assert [(s.request.request_id, s.num_new_tokens) for s in batch.sequences] == [
        ("short", 1),
        ("long", 9),
    ]
    assert [s.request.request_id for s in batch.sampling_sequences] == ["short", "long"]


def test_max_num_seqs_is_respected():
    scheduler = Scheduler(
        BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100
    )
    for i in range(3):
        scheduler.add(make_request(f"r{i}", 2))
    batch, _ = step(scheduler)
    assert len(batch.sequences) == 2 and len(scheduler.waiting) == 1


def test_newest_request_is_preempted_and_recomputed_when_blocks_run_out():
    scheduler = Scheduler(
        BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=100
    )
    old, new = (
        make_request("old", 8, max_tokens=8),
        make_request("new", 7, max_tokens=8),
    )
    scheduler.add(old)
    scheduler.add(new)
    step(scheduler)  # old: 2 blocks, new: 2 blocks, cache full
    assert scheduler.blocks.num_free_blocks == 0
    batch, _ = step(scheduler)  # old needs a 3rd block for position 8: new must go
    assert batch.preempted == ("new",)
    assert new.status is RequestStatus.WAITING and new.num_computed_tokens == 0
    assert new.output_token_ids == [7]  # kept: recomputed, not re-sampled
    assert [s.request.request_id for s in batch.sequences] == ["old"]
    while old.status is not RequestStatus.FINISHED:
        step(scheduler)
    batch, _ = step(scheduler)  # back in: prompt + its output token recomputed at once
    assert batch.sequences[0].request is new and batch.sequences[0].num_new_tokens == 8


def test_preempt_gives_a_place_to_the_requests_queued_and_added_later():
    scheduler = Scheduler(
        BlockManager(16, 4), max_num_seqs=2, max_num_batched_tokens=100
    )
    old, victim = (
        make_request("old", 5, max_tokens=6),
        make_request("v", 5, max_tokens=6),
    )
    scheduler.add(old)
    scheduler.add(victim)
    step(scheduler)
    step(scheduler)
    scheduler.add(make_request("new", 3))
    assert scheduler.preempt("v")  # running: its blocks go, its tokens stay
    assert victim.status is RequestStatus.WAITING and victim.num_computed_tokens == 0
    assert victim.output_token_ids == [7, 7] and scheduler.blocks.num_free_blocks == 14
    scheduler.add(make_request("later", 3))  # added after, and still ahead of it
    assert [r.request_id for r in scheduler.waiting] == ["new", "later", "v"]
    assert not scheduler.preempt("v") and not scheduler.preempt("unknown")
    batch, _ = step(scheduler)  # the place went to the first queued, at once
    assert [s.request.request_id for s in batch.sequences] == ["old", "new"]
    while scheduler.has_unfinished:
        step(scheduler)
    assert victim.finish_reason is FinishReason.LENGTH
    assert victim.output_token_ids == [7] * 6 and victim.num_preemptions == 1
    assert scheduler.blocks.num_free_blocks == 16 and not scheduler.yielded


@pytest.mark.parametrize(
    ("sampling", "token", "reason", "length"),
    [
        ({}, 7, FinishReason.LENGTH, 4),
        ({}, 0, FinishReason.STOP, 1),  # EOS
        ({"ignore_eos": True}, 0, FinishReason.LENGTH, 4),
        ({"stop_token_ids": (7,)}, 7, FinishReason.STOP, 1),
    ],
)
def test_requests_finish_and_free_their_blocks(sampling, token, reason, length):
    scheduler = Scheduler(
        BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=100
    )
    request = make_request("r", 5, max_tokens=4, **sampling)
    scheduler.add(request)
    while not request.is_finished:
        step(scheduler, token)
    assert request.finish_reason is reason and len(request.output_token_ids) == length
    assert scheduler.blocks.num_free_blocks == 16 and not scheduler.has_unfinished


def test_context_length_ends_a_request():
    scheduler = Scheduler(
        BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=100
    )
    request = make_request("r", 5, max_tokens=100)
    request.max_model_len = 8
    scheduler.add(request)
    while not request.is_finished:
        step(scheduler)
    assert request.finish_reason is FinishReason.LENGTH and request.num_tokens == 8


def test_finish_removes_waiting_and_running_requests():
    scheduler = Scheduler(
        BlockManager(16, 4), max_num_seqs=1, max_num_batched_tokens=100
    )
    running, waiting = make_request("a", 3), make_request("b", 3)
    scheduler.add(running)
    scheduler.add(waiting)
    step(scheduler)
    scheduler.finish(waiting, FinishReason.ABORT)
    scheduler.finish(running, FinishReason.ABORT)
    assert not scheduler.has_unfinished and scheduler.blocks.num_free_blocks == 16
    assert running.finish_reason is FinishReason.ABORT


def test_sampling_params_refuse_bad_values_with_reasons():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=100)
    assert SamplingParams(stop="x").stop == ("x",)
