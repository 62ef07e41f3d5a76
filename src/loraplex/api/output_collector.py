"""OutputCollector: one request's outputs waiting for the event loop, merged while they wait.

The engine produces one output per request per step. When the event loop falls behind (many
streams, a slow client), outputs of one request pile up. Sending each as its own SSE chunk makes
the loop's work grow with the backlog: a JSON body, a socket write and several coroutine hops
per token. Merging what has piled up into one output (text and tokens concatenated) makes a
stream that is k steps behind cost one chunk, so the loop catches up instead of falling further
behind. vLLM's output collector does the same for the same reason.
"""

from __future__ import annotations

import asyncio
import dataclasses

from loraplex.platform import RequestOutput


def merge_outputs(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """One output saying what `first` and then `then` said (same request, in this order)."""
    return dataclasses.replace(
        then,
        new_token_ids=first.new_token_ids + then.new_token_ids,
        text_delta=first.text_delta + then.text_delta,
        logprobs=first.logprobs + then.logprobs,
        queue_s=then.queue_s if then.queue_s is not None else first.queue_s,
        prefill_s=then.prefill_s if then.prefill_s is not None else first.prefill_s,
    )


class OutputCollector:
    """Outputs of one request not yet read, merged into one; then, maybe, an error.

    `put` and `fail` run on the event loop (the engine thread hands outputs over with
    `call_soon_threadsafe`); `get` returns everything that arrived since the last `get`.
    """

    __slots__ = ("_error", "_pending", "_waiter")

    def __init__(self) -> None:
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put(self, out: RequestOutput) -> None:
        pending = self._pending
        self._pending = out if pending is None else merge_outputs(pending, out)
        self._wake()

    def fail(self, error: BaseException) -> None:
        """After the outputs already put, `get` raises `error`."""
        self._error = error
        self._wake()

    async def get(self) -> RequestOutput:
        while self._pending is None:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        out, self._pending = self._pending, None
        return out

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
