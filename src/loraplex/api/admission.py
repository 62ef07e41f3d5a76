"""Admission in front of the engine: tenant limits, fair queueing, adapter-aware ordering.

The engine runs `seats` requests at once; calls beyond wait here, not in its first-come-first-
served queue, and start in this order: tenants in turn (the one served longest ago first);
within a turn, the first call that is ready (its adapter in a slot, or a slot can take it);
a call that waits for a slot may be overtaken `max_bypass` times, then it is due and holds
back what would delay its slot. Waiting calls prefetch their adapters. When every seat is
taken, a call may take the seats of a tenant that runs more (fair_share.py, `preempt`).
docs/api.md ("Admission and fairness") and docs/architecture.md tell the why.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable

from .admission_types import (
    AdapterResidency,
    AdmissionConfig,
    AdmissionStats,
    AllResident,
    ClientGone,
    Refused,
    Ticket,
    TokenBuckets,
    Waiter,
    WaitEstimate,
    deliver,
)
from .fair_share import FairShare

__all__ = ["Admission", "AdmissionConfig", "ClientGone", "Refused", "Ticket"]


class Admission:
    """Seats, per-tenant queues and limits; thread-safe, waiters on any event loop."""

    def __init__(
        self,
        config: AdmissionConfig,
        residency: AdapterResidency | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.residency = residency or AllResident()
        self.clock = clock
        self._lock = threading.RLock()
        self._seq = itertools.count()
        self._queues: dict[str, deque[Waiter]] = {}
        # Round robin: the tenant served longest ago goes first (a newcomer before all).
        self._served: dict[str, int] = {}  # tenant → number of its last grant
        self._grant_seq = itertools.count()
        self._in_use = 0
        self._active: Counter[str] = Counter()  # admitted or waiting, per tenant
        self._reserved: Counter[Hashable] = Counter()  # cold keys admitted, not loaded
        self._buckets = None
        if config.tenant_token_rate > 0:
            rate, burst = config.tenant_token_rate, config.tenant_token_burst
            self._buckets = TokenBuckets(rate, burst)
        self._estimate = WaitEstimate()
        self._bypassed_total = 0
        # (tenant served, tenants that were waiting too): round robin, made checkable.
        self._grants: deque[tuple[str, tuple[str, ...]]] = deque(maxlen=256)
        self._fair = FairShare(clock)
        self._last_dispatch = -math.inf
        self._where_cache: dict[Hashable, str] | None = None  # during one dispatch
        # Observers of each admitted call: (tenant, residency, seconds waited).
        self.waits: list[Callable[[str, str, float], None]] = []

    # -- the call's side ----------------------------------------------------------------

    async def admit(
        self,
        tenant: str,
        key: Hashable | None,
        seats: int = 1,
        tokens: int = 0,
        disconnected: Callable[[], Awaitable[object]] | None = None,
    ) -> Ticket:
        """Wait for a seat (and a slot for a cold adapter) in fair order.

        :param key: the adapter (as the residency knows it), or None for the base model.
        :param disconnected: a coroutine function that returns when the client has left.
        :raises Refused: a limit (429), the queue bound or the wait for a slot (503).
        :raises ClientGone: the client left while the call waited.
        """
        seats = max(1, min(seats, self.config.seats))
        loop = asyncio.get_running_loop()
        with self._lock:
            self._check_limits(tenant, tokens, key)
            fut = loop.create_future()
            waiter = Waiter(
                next(self._seq), tenant, key, seats, self.clock(), fut, loop
            )
            self._active[tenant] += 1
            self._queues.setdefault(tenant, deque()).append(waiter)
            waiter.where = self._where(key)
            self._dispatch()
        if not waiter.future.done() and waiter.where in ("host", "disk"):
            # Into a free slot (no eviction), else host memory: the load overlaps the wait.
            free, _ = self.residency.room()
            self.residency.prefetch(key, "device" if free > 0 else "host")
        try:
            return await self._wait(waiter, disconnected)
        except BaseException:
            self._abandon(waiter)
            raise

    async def again(self, ticket: Ticket, disconnected=None) -> Ticket:
        """The call's slot went to another call after all: its seats go back, and it waits
        again, first of its tenant's queue, blocked since it first was."""
        waiter, loop = ticket.waiter, asyncio.get_running_loop()
        with self._lock:
            self._unreserve(ticket)
            ticket.released = True
            self._in_use -= ticket.seats
            self._fair.end(ticket)
            waiter.future, waiter.loop = loop.create_future(), loop
            waiter.blocked, waiter.blocked_since = True, ticket.blocked_since
            self._queues.setdefault(waiter.tenant, deque()).appendleft(waiter)
            self._dispatch()
        try:
            return await self._wait(waiter, disconnected)
        except BaseException:
            self._abandon(waiter)
            raise

    async def _wait(self, waiter: Waiter, disconnected) -> Ticket:
        watcher = None
        if disconnected is not None and not waiter.future.done():
            watcher = asyncio.ensure_future(disconnected())
        try:
            while not waiter.future.done():
                # A cold call re-checks often: a slot frees when some other call's
                # release unpins it, which admission does not always see.
                tick = 0.05 if waiter.key is not None else 0.5
                pending = {waiter.future} | ({watcher} if watcher else set())
                done, _ = await asyncio.wait(pending, timeout=tick)
                if waiter.future.done():
                    break
                if watcher in done:
                    raise ClientGone()
                with self._lock:
                    self._expire(waiter)
                    if time.monotonic() - self._last_dispatch >= 0.05:  # once for all
                        self._dispatch()
            return waiter.future.result()
        finally:
            if watcher is not None:
                watcher.cancel()

    def _abandon(self, waiter: Waiter) -> None:
        with self._lock:
            queue = self._queues.get(waiter.tenant)
            if queue is not None and waiter in queue:
                self._remove(waiter)
                self._leave(waiter.tenant)
                self._dispatch()
                return
        if waiter.future.done() and not waiter.future.cancelled():
            waiter.future.result().release()  # granted as it gave up: seats go back

    # -- limits -----------------------------------------------------------------------------

    def _check_limits(self, tenant: str, tokens: int, key) -> None:
        config = self.config
        if self._active[tenant] >= config.max_per_tenant:
            raise Refused.of("tenant_limit", 1)
        waiting = sum(len(q) for q in self._queues.values())
        if self._in_use >= config.seats and waiting >= config.max_queued:
            raise Refused.of("queue_full", self.expected_wait_s(key=key))
        if self._buckets is not None and tokens > 0:
            self._buckets.take(tenant, tokens, self.clock())

    def _expire(self, waiter: Waiter) -> None:
        since = waiter.blocked_since
        if since is None or self.clock() - since < self.config.adapter_wait_s:
            return
        if waiter in self._queues.get(waiter.tenant, ()):
            self._remove(waiter)
            self._leave(waiter.tenant)
            wait = max(1.0, self.expected_wait_s(key=waiter.key))
            raise Refused.of("adapter_wait", wait)

    # -- dispatch (under the lock) ------------------------------------------------------------

    def _where(self, key) -> str:
        if key is None:
            return "base"
        cache = self._where_cache
        if cache is None:
            return self.residency.residency(key)
        if key not in cache:
            cache[key] = self.residency.residency(key)
        return cache[key]

    def _room_left(self) -> int:
        free, evictable = self.residency.room()
        pending = sum(
            1
            for key, n in self._reserved.items()
            if n > 0 and self._where(key) in ("host", "disk")
        )
        return free + evictable - pending

    def _ready(self, w: Waiter, room_left: int, fit: bool = True) -> bool:
        seats = self._in_use + w.seats
        fits = not fit or seats <= self.config.seats or not self._in_use
        if w.key is None:
            return fits
        w.where = self._where(w.key)
        has_slot = w.where in ("device", "loading") or self._reserved[w.key] > 0
        w.blocked = not (has_slot or room_left > 0)
        w.blocked_since = (w.blocked_since or self.clock()) if w.blocked else None
        return fits and not w.blocked

    def _due(self) -> Waiter | None:
        due = [
            w
            for q in self._queues.values()
            for w in q
            if w.blocked and w.bypassed >= self.config.max_bypass
        ]
        return min(due, key=lambda w: w.seq) if due else None

    def _tenants_in_turn(self) -> list[str]:
        return sorted(self._queues, key=lambda t: self._served.get(t, -1))

    def _in_turn(self):
        for tenant in self._tenants_in_turn():
            yield from list(self._queues[tenant])

    def _dispatch(self) -> None:
        self._last_dispatch = time.monotonic()
        self._where_cache = {}  # residency can only improve within one pass
        try:
            self._dispatch_pass()
        finally:
            self._where_cache = None

    def _dispatch_pass(self) -> None:
        room_left = self._room_left()
        while self._queues and self._in_use < self.config.seats:
            due = self._due()
            if due is not None and self._ready(due, room_left):
                pick = due
            else:
                pick = self._next_ready(room_left, due)
            if pick is None:
                break
            room_left = self._take(pick, room_left)
            if self._where_cache is None:  # a nested release ended the pass
                return
        self._displace(room_left)

    def _displace(self, room_left: int) -> None:
        """Every place is taken: a tenant's first ready call takes the places of requests
        of a tenant that runs more (fair_share.py), unless a call is due for a slot."""
        while self.config.preempt and self._queues and self._due() is None:
            for tenant in self._tenants_in_turn():
                queue = self._queues[tenant]
                w = next((w for w in queue if self._ready(w, room_left, False)), None)
                now = (self._in_use, self.config.seats)
                displaces = self._fair.pick(tenant, w.seats, *now) if w else None
                if displaces:
                    break
            else:
                return
            room_left = self._take(w, room_left, displaces)
            if self._where_cache is None:
                return

    def _take(self, pick: Waiter, room_left: int, displaces=()) -> int:
        """Admit `pick` (a cold adapter reserves a slot); the slots left."""
        if pick.key is not None and pick.where in ("host", "disk"):
            if self._reserved[pick.key] == 0:
                room_left -= 1
            self._reserved[pick.key] += 1
        self._grant(pick, displaces)
        return room_left

    def _next_ready(self, room_left: int, due: Waiter | None) -> Waiter | None:
        """The first ready call in turn. While `due` waits for a slot, another call may
        start only if it leaves `due` its seats, needs no slot of its own, and does not
        pin the adapter whose slot should free first (the fewest pins)."""
        if due is None:
            return next((w for w in self._in_turn() if self._ready(w, room_left)), None)
        victim = self.residency.victim()
        for w in self._in_turn():
            if w is due or self._in_use + w.seats + due.seats > self.config.seats:
                continue
            if w.key is None:
                return w
            if w.key != victim and (
                self._where(w.key) in ("device", "loading") or self._reserved[w.key]
            ):
                w.where = self._where(w.key)
                return w
        return None

    def _grant(self, w: Waiter, displaces=()) -> None:
        self._remove(w)
        for other in self._in_turn():
            if other.blocked and other.seq < w.seq:
                other.bypassed += 1
                self._bypassed_total += 1
        self._in_use += w.seats
        self._grants.append((w.tenant, tuple(sorted(self._queues))))
        self._served[w.tenant] = next(self._grant_seq)
        waited = self.clock() - w.enqueued
        ticket = Ticket(self, w, w.tenant, w.key, w.seats, waited, w.where)
        ticket.blocked_since = w.blocked_since or (self.clock() if w.blocked else None)
        self._fair.add(ticket, displaces, self._in_use - w.seats, self.config.seats)
        for observe in self.waits:
            observe(w.tenant, w.where, waited)
        if w.future.done():  # cancelled: give the seats back at once
            self._release(ticket)
            return
        deliver(w, ticket, self)

    def _leave(self, tenant: str) -> None:
        self._active[tenant] -= 1
        if self._active[tenant] <= 0:
            del self._active[tenant]

    def _remove(self, w: Waiter) -> None:
        queue = self._queues[w.tenant]
        queue.remove(w)
        if not queue:
            del self._queues[w.tenant]

    # -- the ticket's side -----------------------------------------------------------------

    def _loaded(self, ticket: Ticket, seconds: float) -> None:
        with self._lock:
            if self._unreserve(ticket):
                self._estimate.loaded(ticket.where, seconds)

    def _start(self, ticket: Ticket, request_ids) -> list[str]:
        with self._lock:
            return [] if ticket.released else self._fair.started(ticket, request_ids)

    def _unreserve(self, ticket: Ticket) -> bool:
        """End the call's reservation of a slot; whether it had one."""
        if ticket.acquired:
            return False
        ticket.acquired = True
        if ticket.key is None or ticket.where not in ("host", "disk"):
            return False
        self._reserved[ticket.key] -= 1
        if self._reserved[ticket.key] <= 0:
            del self._reserved[ticket.key]
        return True

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.released:
                return
            self._unreserve(ticket)
            ticket.released = True
            self._in_use -= ticket.seats
            self._fair.end(ticket)
            self._leave(ticket.tenant)
            self._estimate.freed(self.clock())
            self._dispatch()

    # -- what admission reports ----------------------------------------------------------

    def expected_wait_s(self, tenant: str | None = None, key=None) -> float:
        """Seconds a call arriving now would wait: the calls ahead of it in turn, at the
        measured rate seats free, plus the measured load time of its adapter."""
        with self._lock:
            waiting = sum(len(q) for q in self._queues.values())
            ahead = waiting
            if tenant is not None:
                mine = len(self._queues.get(tenant, ())) + 1
                ahead = min(waiting, mine * max(1, len(self._queues)))
            full = self._in_use >= self.config.seats
            where = self._where(key) if key is not None else "device"
            return self._estimate.seconds(ahead, full, where)

    def stats(self) -> AdmissionStats:
        with self._lock:
            return AdmissionStats(
                waiting=sum(len(q) for q in self._queues.values()),
                seats_in_use=self._in_use,
                seats=self.config.seats,
                waiting_by_tenant={t: len(q) for t, q in self._queues.items()},
                active_by_tenant=dict(self._active),
                expected_wait_s=self.expected_wait_s(),
                bypassed_total=self._bypassed_total,
                held_for_slot=self._due() is not None,
                preempted_total=self._fair.preempted_total,
                recent_grants=list(self._grants),
            )
