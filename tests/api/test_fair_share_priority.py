"""Engine priorities from fair share (api/fair_share.py): a call is priority 0 while its
tenant holds no more than an equal share of the places among the tenants running now or
lately, 1 beyond, and the priority reaches the engine's request. And a tenant at its limit
of calls is refused before any adapter lookup."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from test_fair_share import Clock, _admission

from loraplex.api import EngineClient
from loraplex.api.engine_client import Submission
from loraplex.api.errors import ApiError
from loraplex.api.inference import admitted
from loraplex.api.state import Principal
from loraplex.platform import Engine, EngineConfig, EngineThread, SamplingParams


def test_a_tenant_beyond_an_equal_share_gets_the_worse_priority():
    async def main():
        clock = Clock()
        admission = _admission(clock, seats=4)
        # Alone, a tenant may use every place at priority 0.
        alone = [await admission.admit("f", None) for _ in range(4)]
        assert [t.priority for t in alone] == [0, 0, 0, 0]
        for ticket in alone[2:]:
            ticket.release()
        calm = await admission.admit("calm", None)  # 1 of 2 tenants' 4 places: within
        assert calm.priority == 0
        third = await admission.admit("f", None)  # f's third of 4 places with calm in
        assert third.priority == 1
        # calm ends; over the last seconds it still held about a place: f stays beyond.
        clock.now += 2.0
        calm.release()
        fourth = await admission.admit("f", None)
        assert fourth.priority == 1
        # Long after, f is alone again: back to priority 0.
        for ticket in (third, fourth):
            ticket.release()
        clock.now += 30.0
        again = await admission.admit("f", None)
        assert again.priority == 0
        for ticket in (*alone[:2], again):
            ticket.release()
        return admission.stats()

    stats = asyncio.run(main())
    assert stats.seats_in_use == 0 and stats.active_by_tenant == {}


def test_the_submission_priority_reaches_the_engine_request(demo_assets):
    engine = Engine(
        EngineConfig(
            model=str(demo_assets.model), dtype="float32", device="cpu", max_num_seqs=2
        )
    )
    thread = EngineThread(engine).start()
    client = EngineClient(thread)
    seen: dict[str, int] = {}
    add = engine.scheduler.add

    def recording_add(request):
        seen[request.request_id] = request.priority
        add(request)

    engine.scheduler.add = recording_add

    async def main():
        params = SamplingParams(max_tokens=2, temperature=0.0)
        streams = await client.submit(
            [
                Submission("low", [1, 2, 3], params, None, priority=1),
                Submission("high", [4, 5, 6], params, None),
            ]
        )
        for stream in streams:
            async for _ in stream:
                pass

    try:
        asyncio.run(main())
    finally:
        thread.stop()
    assert seen == {"low": 1, "high": 0}


def test_a_tenant_at_its_limit_is_refused_before_any_adapter_lookup(api_state):
    located = []

    class Locating:
        def locate(self, principal, model):
            located.append(model)
            return model

    state = dataclasses.replace(api_state, resolver=Locating())
    state.active_by_tenant = type(api_state.active_by_tenant)()
    limit = state.admission.config.max_per_tenant
    state.active_by_tenant["acme"] = limit
    rejected = state.metrics.rejections.labels("tenant_limit")._value.get()

    async def call():
        async with admitted(state, Principal("acme"), "pirate"):
            pass

    with pytest.raises(ApiError) as refused:
        asyncio.run(call())
    assert refused.value.status == 429 and refused.value.retry_after == 1
    assert located == []  # no worker thread, no catalog query for it
    assert state.metrics.rejections.labels("tenant_limit")._value.get() == rejected + 1
