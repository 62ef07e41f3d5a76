"""Merging the output streams of one API call, and cancelling work when the client leaves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from loraplex.platform import RequestOutput, TokenLogprobs

from .engine_client import OutputStream

T = TypeVar("T")


@dataclass
class ChoiceResult:
    """One choice's accumulated output."""

    index: int
    num_prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    def add(self, out: RequestOutput) -> None:
        self.num_cached_tokens = out.num_cached_tokens
        self.text += out.text_delta
        self.token_ids.extend(out.new_token_ids)
        self.logprobs.extend(out.logprobs)
        if out.finished:
            self.finish_reason = (
                out.finish_reason.value if out.finish_reason else "abort"
            )


async def merge(
    streams: list[OutputStream], on_done: Callable[[], None] | None = None
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave output streams as outputs arrive: (stream index, output).

    A stream that fails (its engine was lost) raises its error here: a failed stream must
    not read as one that ended. Closing the merged iterator (or cancelling its consumer)
    aborts every unfinished request. `on_done` runs once every stream has ended, as soon as
    the engine is done, even while the consumer still sends earlier outputs to a slow client.
    """
    if len(streams) == 1:  # most calls: no pump task, no second queue hop per output
        stream, done = streams[0], False
        try:
            async for out in stream:
                if out.finished and on_done is not None:
                    done = True
                    on_done()  # before the last chunk goes to a maybe slow client
                yield 0, out
        finally:
            stream.close()
            if not done and on_done is not None:
                on_done()
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()
    pumping = len(streams)

    async def pump(i: int, stream: OutputStream) -> None:
        nonlocal pumping
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer below
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))
            pumping -= 1
            if pumping == 0 and on_done is not None:
                on_done()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, out = await queue.get()
            if out is None:
                remaining -= 1
            elif isinstance(out, Exception):
                raise out
            else:
                yield i, out
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_until_disconnect(receive, work: Awaitable[T]) -> T | None:
    """Await `work`, or cancel it as soon as the client disconnects (then return None)."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    finally:
        watcher.cancel()
