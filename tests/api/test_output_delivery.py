"""The way outputs travel from the engine thread to a response: a step's outputs in one hop
to the event loop (_Delivery), outputs that pile up merged (OutputCollector), and `merge` of a
single stream without a pump task."""

from __future__ import annotations

import asyncio
import threading

import pytest

from loraplex.api.engine_client import _Delivery
from loraplex.api.generation import merge
from loraplex.api.output_collector import OutputCollector, merge_outputs
from loraplex.platform import EngineDeadError, FinishReason, RequestOutput


def _out(i: int, finished: bool = False, **fields) -> RequestOutput:
    return RequestOutput(
        "r",
        [i],
        f"<{i}>",
        finished,
        FinishReason.LENGTH if finished else None,
        num_output_tokens=i + 1,
        **fields,
    )


def test_merged_output_says_both_in_order():
    first = _out(0, queue_s=0.5, logprobs=["a"])
    then = _out(1, finished=True, prefill_s=0.25, logprobs=["b"])
    merged = merge_outputs(first, then)
    assert merged.new_token_ids == [0, 1] and merged.text_delta == "<0><1>"
    assert merged.logprobs == ["a", "b"] and merged.num_output_tokens == 2
    assert merged.finished and merged.finish_reason is FinishReason.LENGTH
    assert (merged.queue_s, merged.prefill_s) == (0.5, 0.25)
    assert first.new_token_ids == [0]  # the parts are left as they were


def test_collector_merges_what_piled_up_and_waits_for_more():
    async def scenario():
        box = OutputCollector()
        for i in range(3):
            box.put(_out(i))
        got = await box.get()
        assert got.new_token_ids == [0, 1, 2] and got.text_delta == "<0><1><2>"
        reader = asyncio.ensure_future(box.get())
        await asyncio.sleep(0)
        assert not reader.done()  # nothing new: it waits
        box.put(_out(3, finished=True))
        got = await asyncio.wait_for(reader, 1)
        assert got.new_token_ids == [3] and got.finished

    asyncio.run(scenario())


def test_collector_hands_out_outputs_before_the_error():
    async def scenario():
        box = OutputCollector()
        box.put(_out(0))
        box.fail(EngineDeadError("lost"))
        assert (await box.get()).new_token_ids == [0]
        with pytest.raises(EngineDeadError, match="lost"):
            await box.get()

    asyncio.run(scenario())


def test_delivery_keeps_order_and_takes_a_burst_in_few_hops():
    """10 000 outputs posted from another thread arrive in order, in far fewer loop hops."""

    async def scenario():
        loop = asyncio.get_running_loop()
        hops = 0
        schedule = loop.call_soon_threadsafe

        def counting(callback, *args):
            nonlocal hops
            hops += 1
            return schedule(callback, *args)

        loop.call_soon_threadsafe = counting
        delivery = _Delivery(loop)
        seen: list[int] = []
        done = asyncio.Event()

        def put(out: RequestOutput) -> None:
            seen.append(out.new_token_ids[0])
            if out.finished:
                done.set()

        def engine() -> None:
            for i in range(10_000):
                delivery.post(put, _out(i, finished=i == 9_999))

        thread = threading.Thread(target=engine)
        thread.start()
        await asyncio.wait_for(done.wait(), 10)
        thread.join()
        assert seen == list(range(10_000))
        assert 1 <= hops < 10_000

    asyncio.run(scenario())


class _Stream:
    """An OutputStream fed by the test."""

    def __init__(self, outputs, error=None):
        self.outputs, self.error = list(outputs), error
        self.finished = False
        self.closed = 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        if self.outputs:
            out = self.outputs.pop(0)
            self.finished = out.finished
            return out
        if self.error is not None:
            self.finished = True
            raise self.error
        await asyncio.sleep(3600)  # an unfinished request: only a close ends it

    def close(self):
        self.closed += 1


def test_single_stream_releases_before_its_last_chunk_is_sent():
    async def scenario():
        stream = _Stream([_out(0), _out(1, finished=True)])
        released = []
        seen = []
        async for i, out in merge([stream], on_done=lambda: released.append(1)):
            seen.append((i, out.new_token_ids, len(released)))
        # The finished output came after on_done: the slot is free while it is sent.
        assert seen == [(0, [0], 0), (0, [1], 1)]
        assert released == [1] and stream.closed >= 1

    asyncio.run(scenario())


def test_single_stream_error_and_early_close():
    async def failing():
        stream = _Stream([_out(0)], error=EngineDeadError("gone"))
        released = []
        with pytest.raises(EngineDeadError):
            async for _ in merge([stream], on_done=lambda: released.append(1)):
                pass
        assert released == [1]

    async def abandoned():
        stream = _Stream([_out(0)])
        released = []
        merged = merge([stream], on_done=lambda: released.append(1))
        assert (await merged.__anext__())[1].new_token_ids == [0]
        await merged.aclose()  # the client left
        assert stream.closed == 1 and released == [1]

    asyncio.run(failing())
    asyncio.run(abandoned())
