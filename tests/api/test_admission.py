"""Admission in front of the engine: tenants take turns, resident adapters go first with a
bounded bypass, cold adapters are prefetched, limits refuse with Retry-After, and nothing
leaks when a call gives up."""

from __future__ import annotations

import asyncio

import pytest

from loraplex.api.admission import Admission, AdmissionConfig, ClientGone, Refused


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Residency:
    """Adapters on "device" or cold ("disk"), and how many slots could take a cold one."""

    def __init__(self, device=(), free=0, idle=0) -> None:
        self.device = set(device)
        self.free, self.idle = free, idle
        self.prefetched: list[tuple[str, str]] = []

    def residency(self, key):
        return "device" if key in self.device else "disk"

    def room(self):
        return self.free, self.idle

    def prefetch(self, key, to):
        self.prefetched.append((key, to))

    def victim(self):
        return min(self.device) if self.device else None


def _admission(residency=None, clock=None, **config):
    return Admission(AdmissionConfig(**config), residency, clock or Clock())


async def _settle():
    await asyncio.sleep(0.02)


async def _serve_one_by_one(admission, first, calls, count):
    """Release the running call, see which call starts next, `count` times."""
    order, ticket = [], first
    for _ in range(count):
        ticket.release()
        await _settle()
        started = [c for c in calls if c.done() and c not in order]
        assert len(started) == 1, started
        order.append(started[0])
        ticket = started[0].result()
    ticket.release()
    return [(c.result().tenant, c.result().key) for c in order]


def test_tenants_take_turns_whatever_they_send():
    async def main():
        admission = _admission(seats=1)
        first = await admission.admit("flood", None)
        calls = [asyncio.create_task(admission.admit("flood", None)) for _ in range(6)]
        await _settle()
        calls += [asyncio.create_task(admission.admit("calm", None)) for _ in range(2)]
        await _settle()
        stats = admission.stats()
        assert stats.waiting == 8 and stats.waiting_by_tenant == {"flood": 6, "calm": 2}
        order = await _serve_one_by_one(admission, first, calls, 8)
        return [tenant for tenant, _ in order], admission.stats()

    order, stats = asyncio.run(main())
    # calm's two calls start at its first two turns, not after flood's queue.
    assert order == [
        "calm",
        "flood",
        "calm",
        "flood",
        "flood",
        "flood",
        "flood",
        "flood",
    ]
    assert (
        stats.waiting == 0 and stats.seats_in_use == 0 and stats.active_by_tenant == {}
    )


def test_resident_adapters_go_first_then_the_cold_one_is_due():
    residency = Residency(device={"hot"})

    async def main():
        admission = _admission(residency, seats=1, max_bypass=3)
        first = await admission.admit("a", "hot")
        cold = asyncio.create_task(admission.admit("a", "cold"))
        await _settle()
        hot = [asyncio.create_task(admission.admit("b", "hot")) for _ in range(5)]
        await _settle()
        assert residency.prefetched == [("cold", "host")]  # no free slot: to host
        first.release()
        await _settle()
        # Hot calls overtake the cold one (no slot for it): three times once it was
        # seen blocked, then it is due and holds everything else.
        for _ in range(4):
            ran = [h for h in hot if h.done() and not h.result().released]
            assert len(ran) == 1 and not cold.done()
            ran[0].result().release()
            await _settle()
        stats = admission.stats()
        assert stats.held_for_slot and stats.bypassed_total == 3
        assert stats.seats_in_use == 0 and not cold.done()
        residency.idle = 1  # a slot frees: the cold call starts before any hot one
        await asyncio.sleep(0.1)
        assert cold.done() and cold.result().where == "disk"
        assert sum(h.done() for h in hot) == 4
        cold.result().loaded(0.5)
        cold.result().release()
        await _settle()
        for h in hot:
            (await h).release()
        return admission.stats()

    stats = asyncio.run(main())
    assert stats.waiting == 0 and stats.active_by_tenant == {}
    assert not stats.held_for_slot


def test_a_cold_call_prefetches_into_a_free_slot_and_reserves_it():
    residency = Residency(free=1)

    async def main():
        admission = _admission(residency, seats=4)
        one = await admission.admit("a", "x")  # room for one cold adapter
        same = await admission.admit("a", "x")  # shares that load
        other = asyncio.create_task(admission.admit("a", "y"))
        await _settle()
        assert not other.done()  # the only slot is reserved for x until it loads
        assert ("y", "device") in residency.prefetched
        residency.device.add("x")
        residency.free = 0
        residency.idle = 1
        one.loaded(0.1)
        same.loaded(0.1)
        await asyncio.sleep(0.1)
        assert other.done()
        for ticket in (one, same, other.result()):
            ticket.release()
        return admission

    admission = asyncio.run(main())
    assert admission.stats().seats_in_use == 0


def test_no_slot_for_too_long_is_503_with_retry_after():
    clock = Clock()

    async def main():
        admission = _admission(Residency(), clock, seats=2, adapter_wait_s=5)
        waiting = asyncio.create_task(admission.admit("a", "cold"))
        await _settle()
        clock.now += 6
        with pytest.raises(Refused) as refused:
            await waiting
        return admission, refused.value

    admission, refused = asyncio.run(main())
    assert refused.status == 503 and refused.code == "pool_exhausted"
    assert refused.reason == "adapter_wait" and refused.retry_after >= 1
    assert admission.stats().active_by_tenant == {} and admission.stats().waiting == 0


def test_token_rate_refuses_with_the_seconds_until_there_are_tokens():
    clock = Clock()

    async def main():
        admission = _admission(
            None, clock, seats=8, tenant_token_rate=100, tenant_token_burst=300
        )
        tickets = [await admission.admit("a", None, tokens=250)]
        with pytest.raises(Refused) as refused:
            await admission.admit("a", None, tokens=100)  # 50 left
        tickets.append(await admission.admit("b", None, tokens=300))  # its own bucket
        clock.now += 1.0  # 100 more
        tickets.append(await admission.admit("a", None, tokens=100))
        tickets.append(await admission.admit("a", None, tokens=0))  # nothing to count
        for ticket in tickets:
            ticket.release()
        return refused.value

    refused = asyncio.run(main())
    assert (refused.status, refused.reason, refused.retry_after) == (
        429,
        "token_rate",
        1,
    )
    assert "100 tokens/s" in str(refused)


def test_concurrency_and_queue_bounds_refuse_with_retry_after():
    async def main():
        admission = _admission(seats=1, max_queued=2, max_per_tenant=2)
        running = await admission.admit("a", None)
        waiting = [asyncio.create_task(admission.admit(t, None)) for t in ("b", "a")]
        await _settle()
        with pytest.raises(Refused) as concurrency:
            await admission.admit("a", None)  # a has two calls in
        with pytest.raises(Refused) as full:
            await admission.admit("c", None)  # two wait already
        running.release()
        for call in waiting:
            await _settle()
            (await call).release()
        return concurrency.value, full.value, admission.stats()

    concurrency, full, stats = asyncio.run(main())
    assert (concurrency.status, concurrency.reason) == (429, "tenant_limit")
    assert (full.status, full.reason) == (503, "queue_full") and full.retry_after >= 1
    assert stats.active_by_tenant == {} and stats.seats_in_use == 0


def test_a_client_that_leaves_while_waiting_leaves_nothing_behind():
    async def main():
        admission = _admission(seats=1)
        running = await admission.admit("a", None)
        gone = asyncio.Event()
        waiting = asyncio.create_task(
            admission.admit("b", None, disconnected=gone.wait)
        )
        cancelled = asyncio.create_task(admission.admit("c", None))
        await _settle()
        gone.set()
        with pytest.raises(ClientGone):
            await waiting
        cancelled.cancel()
        await _settle()
        stats = admission.stats()
        assert stats.waiting == 0 and set(stats.active_by_tenant) == {"a"}
        running.release()
        running.release()  # twice is harmless
        return admission.stats()

    stats = asyncio.run(main())
    assert stats.seats_in_use == 0 and stats.active_by_tenant == {}


def test_expected_wait_follows_the_measured_rate():
    clock = Clock()

    async def main():
        admission = _admission(None, clock, seats=1)
        ticket = await admission.admit("a", None)
        for _ in range(5):  # a seat frees every 2 s
            clock.now += 2
            ticket.release()
            ticket = await admission.admit("a", None)
        assert admission.expected_wait_s() == pytest.approx(2.0)  # next free seat
        calls = [asyncio.create_task(admission.admit("a", None)) for _ in range(3)]
        await _settle()
        # Three calls ahead of a new one: it starts after four seats free.
        assert admission.stats().expected_wait_s == pytest.approx(8.0)
        ticket.release()
        for call in calls:
            await _settle()
            (await call).release()

    asyncio.run(main())
