"""Fair share in admission (api/fair_share.py): with every seat taken, a tenant running fewer
starts at once in the place of the newest request of the tenant running the most; a tenant
alone keeps every seat, tenants at equal shares never trade places, and the flooder's
calls all run in the end."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest

from loraplex.adapters_registry import load_adapter_dir
from loraplex.api import EngineClient, create_app
from loraplex.api.admission import Admission, AdmissionConfig
from loraplex.platform import Engine, EngineConfig, EngineThread


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _admission(clock=None, **config) -> Admission:
    return Admission(AdmissionConfig(preempt=True, **config), None, clock or Clock())


async def _settle() -> None:
    await asyncio.sleep(0.02)


async def _running(admission: Admission, tenant: str, count: int) -> list:
    """`count` calls of `tenant`, admitted and queued in the engine as `<tenant><i>`."""
    tickets = []
    for _ in range(count):
        ticket = await asyncio.wait_for(admission.admit(tenant, None), 1)
        assert ticket.start([f"{tenant}{len(tickets)}"]) == []
        tickets.append(ticket)
    return tickets


def test_a_tenant_running_fewer_starts_at_once_in_the_newest_place():
    async def main():
        admission = _admission(seats=4)
        flood = await _running(admission, "f", 4)
        queued = [asyncio.create_task(admission.admit("f", None)) for _ in range(3)]
        await _settle()
        assert not any(q.done() for q in queued)
        # No seat is free, and none is released: the calm tenant starts at once.
        first = await asyncio.wait_for(admission.admit("calm", None), 1)
        assert first.start(["calm0"]) == ["f3", "f2", "f1", "f0"]  # newest first
        second = await asyncio.wait_for(admission.admit("calm", None), 1)
        # f3 waits in the engine now: never its place again while it waits.
        assert second.start(["calm1"]) == ["f2", "f1", "f0"]
        stats = admission.stats()
        assert stats.seats_in_use == 6 and stats.preempted_total == 2
        # 2 places each: a third calm call waits (no swap inverts who runs more).
        third = asyncio.create_task(admission.admit("calm", None))
        await _settle()
        assert not third.done() and not any(q.done() for q in queued)
        first.release()  # f3 runs again; calm runs 1 of 4 again: the third starts
        await _settle()
        assert third.done() and not any(q.done() for q in queued)
        assert third.result().start(["calm2"]) == ["f1", "f0", "f3"]
        # The flooder's waiting calls start as its requests end (none is starved).
        for ticket in (second, third.result(), *flood):
            ticket.release()
            await _settle()
        assert all(q.done() for q in queued)
        for q in queued:
            q.result().release()
        return admission.stats()

    stats = asyncio.run(main())
    assert stats.seats_in_use == 0 and stats.waiting == 0
    assert stats.active_by_tenant == {} and stats.preempted_total == 3


def test_a_tenant_alone_uses_every_seat_and_loses_none():
    async def main():
        admission = _admission(seats=3)
        tickets = await _running(admission, "solo", 3)
        more = asyncio.create_task(admission.admit("solo", None))
        await _settle()
        assert not more.done() and admission.stats().seats_in_use == 3
        tickets[0].release()
        await _settle()
        assert more.done() and more.result().start(["solo3"]) == []
        for ticket in (*tickets[1:], more.result()):
            ticket.release()
        return admission.stats()

    stats = asyncio.run(main())
    assert stats.preempted_total == 0 and stats.seats_in_use == 0


def test_tenants_at_equal_shares_never_trade_places():
    clock = Clock()

    async def main():
        admission = _admission(clock, seats=4)
        tickets = await _running(admission, "a", 2) + await _running(admission, "b", 2)
        clock.now += 30  # both held 2 seats for long: equal usage too
        queued = [
            asyncio.create_task(admission.admit(t, None)) for t in ("a", "b", "a")
        ]
        await asyncio.sleep(0.15)  # a few dispatch ticks
        assert not any(q.done() for q in queued)
        assert admission.stats().preempted_total == 0
        tickets[0].release()  # one freed seat: one call starts, in turn
        await _settle()
        started = [q for q in queued if q.done()]
        assert len(started) == 1 and admission.stats().preempted_total == 0
        for ticket in tickets[1:]:
            ticket.release()
        await _settle()
        for q in queued:
            (await q).release()
        return admission.stats()

    stats = asyncio.run(main())
    assert stats.seats_in_use == 0 and stats.preempted_total == 0


def test_a_tenant_that_used_less_bursts_past_half_but_leaves_one_running():
    clock = Clock()

    async def main():
        admission = _admission(clock, seats=4)
        flood = await _running(admission, "f", 4)
        queued = asyncio.create_task(admission.admit("f", None))
        clock.now += 10  # the flooder held every seat for 10 s
        calm = []
        for i in range(3):  # 2 by max-min, the third because calm used far less
            calm.append(await asyncio.wait_for(admission.admit("calm", None), 1))
            assert len(calm[-1].start([f"calm{i}"])) >= 1
        fourth = asyncio.create_task(admission.admit("calm", None))
        await _settle()
        assert not fourth.done()  # the flooder keeps one request running
        assert admission.stats().preempted_total == 3
        for ticket in (*flood, *calm):
            ticket.release()
        await _settle()
        assert fourth.done() and queued.done()
        fourth.result().release()
        queued.result().release()
        return admission.stats()

    stats = asyncio.run(main())
    assert stats.seats_in_use == 0 and stats.active_by_tenant == {}


def test_a_call_that_ends_before_it_starts_leaves_the_places_taken():
    async def main():
        admission = _admission(seats=2)
        flood = await _running(admission, "f", 2)
        gone = await asyncio.wait_for(admission.admit("calm", None), 1)
        gone.release()  # never started (say its client left): f1 keeps its place
        after = await asyncio.wait_for(admission.admit("calm", None), 1)
        assert after.start(["calm1"]) == ["f1", "f0"]
        for ticket in (*flood, after):
            ticket.release()
        return admission.stats()

    stats = asyncio.run(main())
    assert stats.preempted_total == 1 and stats.seats_in_use == 0


def test_without_preempt_a_call_waits_for_a_released_seat():
    async def main():
        admission = Admission(AdmissionConfig(seats=2), None, Clock())
        flood = await _running(admission, "f", 2)
        calm = asyncio.create_task(admission.admit("calm", None))
        await _settle()
        assert not calm.done()
        flood[0].release()
        await _settle()
        assert calm.done() and calm.result().start(["calm0"]) == []
        for ticket in (flood[1], calm.result()):
            ticket.release()
        return admission.stats()

    assert asyncio.run(main()).preempted_total == 0


# -- through the server, on the demo model ------------------------------------------------

LONG = {"model": "pirate", "prompt": "Hi", "max_tokens": 120, "temperature": 0}
SHORT = {"model": "robot", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
ACME = {"Authorization": "Bearer key-acme"}
GLOBEX = {"Authorization": "Bearer key-globex"}


@pytest.fixture
def two_seats(api_state, demo_assets):
    """The demo model in an engine of 2 places, behind an API of 2 seats."""
    tokenizer = api_state.text.tokenizer
    engine = Engine(
        EngineConfig(
            model=str(demo_assets.model),
            dtype="float32",
            device="cpu",
            max_loras=3,
            max_lora_rank=32,
            max_model_len=256,
            max_num_seqs=2,
        ),
        tokenizer=tokenizer.backend_tokenizer,
    )
    slots = api_state.resolver.slots
    for name, path in demo_assets.adapters.items():
        engine.load_adapter(slots[name], load_adapter_dir(path, engine.spec, 32))
    thread = EngineThread(engine).start()
    config = dataclasses.replace(api_state.config, max_num_seqs=2)
    state = dataclasses.replace(
        api_state,
        config=config,
        client=EngineClient(thread),
        resolver=type(api_state.resolver)(slots),
    )
    state.active_by_tenant = type(api_state.active_by_tenant)()
    yield create_app(state), state, engine
    thread.stop()


async def _until(condition) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_a_flooded_server_starts_the_other_tenant_at_once_with_its_own_adapter(
    two_seats,
):
    app, state, engine = two_seats

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", timeout=120
        ) as c:

            async def post(body, headers):
                answer = await c.post("/v1/completions", json=body, headers=headers)
                assert answer.status_code == 200, answer.text
                return answer.json()["choices"][0]["text"]

            alone = {"long": await post(LONG, ACME), "short": await post(SHORT, GLOBEX)}
            flood = [asyncio.create_task(post(LONG, ACME)) for _ in range(4)]
            await _until(lambda: state.admission.stats().waiting == 2)
            steady = await post(SHORT, GLOBEX)
            # Done while both of the flooder's running calls (120 tokens) still run.
            unfinished = sum(not f.done() for f in flood)
            flooded = await asyncio.gather(*flood)
            await _until(lambda: state.client.stats().num_running == 0)
            return alone, steady, unfinished, flooded

    alone, steady, unfinished, flooded = asyncio.run(main())
    assert unfinished == 4 and state.admission.stats().preempted_total >= 1
    # Its own adapter, and the preempted calls' outputs unchanged by their recompute.
    assert steady == alone["short"] and flooded == [alone["long"]] * 4
    stats = state.admission.stats()
    assert (
        stats.seats_in_use == 0 and stats.waiting == 0 and stats.active_by_tenant == {}
    )
    assert state.client.num_active == 0 and not engine.scheduler.has_unfinished
    assert not engine.scheduler.yielded
