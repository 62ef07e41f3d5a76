"""Every limit of the API: stop strings, logprobs, n, the bounded queue, per-tenant concurrency."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest

from loraplex.api import ApiConfig, EngineClient, create_app

ACME = {"Authorization": "Bearer key-acme"}
GLOBEX = {"Authorization": "Bearer key-globex"}
LONG = {"model": "demo-base", "prompt": "Hi", "max_tokens": 200, "ignore_eos": True}


@pytest.fixture
def small_app(api_state):
    """The shared engine behind an API of tiny limits (and its own request counter)."""
    config = ApiConfig(
        served_model_name="demo-base",
        max_model_len=256,
        max_num_seqs=1,
        max_queued_requests=1,
        max_concurrent_per_tenant=1,
    )
    state = dataclasses.replace(
        api_state, config=config, client=EngineClient(api_state.client.thread)
    )
    state.active_by_tenant = type(api_state.active_by_tenant)()
    return create_app(state)


async def _post(client, body, headers):
    return await client.post("/v1/completions", json=body, headers=headers)


def test_field_limits_are_400_with_the_reason(small_app):
    async def main():
        transport = httpx.ASGITransport(app=small_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            base = {"model": "demo-base", "prompt": "Hi", "max_tokens": 2}
            stops = await _post(c, {**base, "stop": [f"s{i}" for i in range(17)]}, ACME)
            long_stop = await _post(c, {**base, "stop": "x" * 300}, ACME)
            logprobs = await _post(c, {**base, "logprobs": 21}, ACME)
            n = await _post(c, {**base, "n": 9}, ACME)
            return stops, long_stop, logprobs, n

    stops, long_stop, logprobs, n = asyncio.run(main())
    assert stops.status_code == 400 and "at most 16 stop sequences" in stops.text
    assert long_stop.status_code == 400 and "1 to 256 characters" in long_stop.text
    assert logprobs.status_code == 400 and "at most 20 logprobs" in logprobs.text
    assert n.status_code == 400 and "n is at most 8" in n.text


async def _until(condition) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_queue_bound_503_and_tenant_limit_429_with_retry_after(small_app):
    state = small_app.state.api
    body = {**LONG, "max_tokens": 250}

    async def main():
        transport = httpx.ASGITransport(app=small_app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", timeout=60
        ) as c:
            first = asyncio.create_task(_post(c, body, ACME))
            await _until(
                lambda: state.client.num_active == 1
            )  # acme's one slot is taken
            same_tenant = await _post(c, {**LONG, "max_tokens": 1}, ACME)
            second = asyncio.create_task(_post(c, body, GLOBEX))  # fills the queue of 1
            await _until(lambda: state.admission.stats().waiting == 1)
            admin = {"Authorization": "Bearer key-admin"}
            overflow = await _post(c, {**LONG, "max_tokens": 1}, admin)
            return same_tenant, overflow, await first, await second

    same_tenant, overflow, first, second = asyncio.run(main())
    assert same_tenant.status_code == 429 and same_tenant.headers["Retry-After"] == "1"
    assert overflow.status_code == 503 and overflow.headers["Retry-After"] == "1"
    assert "x-should-retry" not in overflow.headers  # retryable: the client may retry
    assert first.status_code == 200 and second.status_code == 200
