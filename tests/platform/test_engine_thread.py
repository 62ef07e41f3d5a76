"""EngineThread: requests from several threads, aborts, errors and shutdown."""

from __future__ import annotations

import threading

import pytest
from engine_utils import greedy, run_to_completion

from loraplex.platform import (
    Engine,
    EngineConfig,
    EngineDeadError,
    EngineThread,
    InvalidRequestError,
)


@pytest.fixture
def engine(tiny_models):
    config = EngineConfig(
        model=str(tiny_models["llama2"]), dtype="float32", device="cpu", max_loras=0
    )
    return Engine(config)


def collect(thread: EngineThread, request_id, prompt, params):
    done = threading.Event()
    outputs = []

    def on_output(out):
        outputs.append(out)
        if out.finished:
            done.set()

    thread.add_request(request_id, prompt, params, None, on_output).result(timeout=10)
    return outputs, done


def test_requests_from_many_threads_match_a_direct_run(engine, tiny_models):
    direct = Engine(engine.config)
    prompts = {f"r{i}": list(range(1 + i, 9 + 2 * i)) for i in range(6)}
    expected = run_to_completion(
        direct, {k: (p, greedy(8), None) for k, p in prompts.items()}
    )
    thread = EngineThread(engine).start()
    results = {}

    def submit(rid):
        outputs, done = collect(thread, rid, prompts[rid], greedy(8))
        assert done.wait(30)
        results[rid] = [t for o in outputs for t in o.new_token_ids]

    workers = [threading.Thread(target=submit, args=(rid,)) for rid in prompts]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    thread.stop()
    assert results == expected


def test_invalid_request_fails_its_future_and_the_thread_goes_on(engine):
    thread = EngineThread(engine).start()
    future = thread.add_request("bad", [], greedy(4), None, lambda out: None)
    with pytest.raises(InvalidRequestError, match="empty"):
        future.result(timeout=10)
    outputs, done = collect(thread, "good", [1, 2, 3], greedy(3))
    assert done.wait(30) and outputs[-1].finish_reason.value == "length"
    thread.stop()


def test_abort_and_stop_end_requests_with_reason_abort(engine):
    thread = EngineThread(engine).start()
    outputs, done = collect(thread, "long", [1, 2, 3], greedy(200))
    assert thread.abort("long").result(timeout=10)
    assert done.wait(30) and outputs[-1].finish_reason.value == "abort"
    outputs, done = collect(thread, "cut", [1, 2, 3], greedy(200))
    thread.stop()
    assert done.wait(5) and outputs[-1].finish_reason.value == "abort"
    with pytest.raises(EngineDeadError):
        thread.call(lambda e: None).result(timeout=1)


def test_a_failing_step_takes_the_thread_down_with_a_clear_error(engine):
    thread = EngineThread(engine).start()

    def explode():
        raise RuntimeError("device fell off the bus")

    engine.step = explode
    outputs, done = collect(thread, "doomed", [1, 2], greedy(4))
    assert done.wait(10) and outputs[-1].finish_reason.value == "abort"
    assert isinstance(thread.error, RuntimeError) and not thread.alive
    with pytest.raises(EngineDeadError, match="device fell off the bus"):
        thread.call(lambda e: None).result(timeout=1)


def test_step_times_count_every_token_by_kind_and_the_thread_time(engine):
    """Prompts of 5 and 9 tokens, 4 tokens each: 14 prompt tokens in prefill steps, then 3
    decodes each in eager decode steps (no graphs on the CPU); the thread's time outside
    steps is accounted too."""
    thread = EngineThread(engine).start()
    runs = [
        collect(thread, rid, list(range(1, 1 + n)), greedy(4))
        for rid, n in (("a", 5), ("b", 9))
    ]
    assert all(done.wait(30) for _, done in runs)
    thread.call(lambda e: None).result(timeout=10)  # one more pass: the stats are fresh
    stats = thread.stats()
    thread.stop()
    steps = stats.step_totals
    assert steps["decode_graph"].steps == 0
    assert steps["prefill"].steps >= 1 and steps["decode_eager"].steps >= 3
    assert steps["prefill"].tokens + steps["decode_eager"].tokens == 14 + 2 * 3
    assert steps["decode_eager"].tokens <= 6  # prefill steps may carry decodes too
    assert all(t.seconds > 0 for t in steps.values() if t.steps)
    assert all(0 <= t.gpu_wait < t.seconds for t in steps.values() if t.steps)
    assert sum(t.steps for t in steps.values()) == thread.steps
    assert stats.thread_seconds["dispatch"] > 0 and stats.thread_seconds["calls"] > 0
