"""The load generator's first-token hook (soak.py deletes an adapter only once every request
sent to it has its first token): called once, as soon as the first token is read, before the
rest of the stream; never for a refusal."""

from __future__ import annotations

import asyncio

import httpx

from loraplex.loadgen import RequestSpec
from loraplex.loadgen.client import send


def _sse(events: list[str]):
    chunks = [f"data: {e}\n\n".encode() for e in events]
    order: list[str] = []

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self):
            for i, chunk in enumerate(chunks):
                order.append(f"chunk{i}")
                yield chunk

    return Body(), order


def test_send_calls_on_first_token_once_before_reading_the_rest():
    tokens = [
        '{"choices": [{"text": "a", "finish_reason": null}]}',
        '{"choices": [{"text": "b", "finish_reason": null}]}',
        '{"choices": [{"text": "c", "finish_reason": "length"}]}',
        "[DONE]",
    ]
    body, order = _sse(tokens)

    def handler(request):
        return httpx.Response(200, stream=body)

    async def go(status_handler):
        transport = httpx.MockTransport(status_handler)
        async with httpx.AsyncClient(transport=transport) as client:
            spec = RequestSpec(0, 0, "a", "hot", "hi", None, 3, 0.0)
            return await send(
                client, "http://x/v1/completions", "k", spec, {}, 0.0,
                on_first_token=lambda: order.append("first"),
            )  # fmt: skip

    record = asyncio.run(go(handler))
    assert record.ok and record.output_tokens == 3
    assert order == ["chunk0", "first", "chunk1", "chunk2", "chunk3"]

    order.clear()
    refused = asyncio.run(
        go(lambda r: httpx.Response(503, headers={"Retry-After": "1"}, json={}))
    )
    assert refused.outcome == "503" and refused.retry_after == "1"
    assert order == []  # no token, no call
