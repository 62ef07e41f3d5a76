"""Admission in front of the engine: tenant limits, fair queueing, adapter-aware ordering.

The engine runs `seats` requests at once (its batch, `max_num_seqs`); calls beyond that wait
here, not in the engine's first-come-first-served queue, so that the order they start in is
decided with what the engine cannot see:

- **Tenants take turns.** Each tenant has a FIFO of waiting calls; a freed seat goes to the
  next tenant in round-robin order that has a call ready to run. A tenant that floods only
  lengthens its own queue. Per-tenant limits refuse what is over a tenant's concurrency
  (calls running or waiting) or its token rate (prompt + max_tokens per second) with 429.
- **Resident adapters first, with bounded bypass.** A call is ready when its adapter is in a
  device slot (or loading into one), or a slot could take it now (free, or holding an
  adapter nothing pins). A call whose adapter needs a slot while none can be had waits, and
  ready calls go ahead of it — at most `max_bypass` times: then it is due, and nothing else
  starts until a slot frees and it runs. After `adapter_wait_s` without a slot it gets 503.
- **Prefetch while waiting.** A waiting call's cold adapter is loaded disk → host at once (or
  into a free device slot), so that the load overlaps the wait.
- **Expected wait.** Seats free at a measured rate; waiting calls ahead of a new one, divided
  by that rate, plus the measured load time of a cold adapter, is the expected wait: exported
  as a metric and sent as `Retry-After` when a call is refused.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from .admission_types import (
    AdapterResidency,
    AdmissionConfig,
    AdmissionStats,
    AllResident,
    ClientGone,
    Ewma,
    Refused,
    Ticket,
    TokenBuckets,
)

__all__ = ["Admission", "AdmissionConfig", "ClientGone", "Refused", "Ticket"]


@dataclass(eq=False)
class _Waiter:
    seq: int
    tenant: str
    key: Hashable | None  # None: the base model
    seats: int
    enqueued: float
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    bypassed: int = 0
    blocked: bool = False  # last examined: its adapter had no slot to go to
    blocked_since: float | None = None
    where: str = "base"


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
        self._queues: dict[str, deque[_Waiter]] = {}
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
        self._interval = Ewma()  # seconds between two freed seats
        self._last_release: float | None = None
        self._load = {"host": Ewma(), "disk": Ewma()}  # adapter load seconds
        self._bypassed_total = 0
        self._grants: deque[str] = deque(maxlen=256)
        self._last_dispatch = -math.inf
        self._where_cache: dict[Hashable, str] | None = None  # during one dispatch
        self.waits: list[
            Callable[[str, float], None]
        ] = []  # (where, seconds) observers

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
            waiter = _Waiter(
                next(self._seq),
                tenant,
                key,
                seats,
                self.clock(),
                loop.create_future(),
                loop,
            )
            self._active[tenant] += 1
            self._queues.setdefault(tenant, deque()).append(waiter)
            waiter.where = self._where(key)
            self._dispatch()
        if not waiter.future.done():
            self._prefetch(waiter)
        try:
            return await self._wait(waiter, disconnected)
        except BaseException:
            self._abandon(waiter)
            raise

    async def _wait(self, waiter: _Waiter, disconnected) -> Ticket:
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

    def _abandon(self, waiter: _Waiter) -> None:
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
            raise Refused(
                "tenant_limit", 429, "too many concurrent requests for this key", 1
            )
        waiting = sum(len(q) for q in self._queues.values())
        if self._in_use >= config.seats and waiting >= config.max_queued:
            raise Refused(
                "queue_full",
                503,
                "too many requests are queued; retry shortly",
                self.expected_wait_s(key=key),
            )
        if self._buckets is not None and tokens > 0:
            self._buckets.take(tenant, tokens, self.clock())

    def _expire(self, waiter: _Waiter) -> None:
        since = waiter.blocked_since
        if since is None or self.clock() - since < self.config.adapter_wait_s:
            return
        if waiter in self._queues.get(waiter.tenant, ()):
            self._remove(waiter)
            self._leave(waiter.tenant)
            raise Refused(
                "adapter_wait",
                503,
                "every adapter slot is in use by running requests; retry shortly",
                max(1.0, self.expected_wait_s(key=waiter.key)),
                code="pool_exhausted",
            )

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

    def _ready(self, w: _Waiter, room_left: int) -> bool:
        fits = self._in_use == 0 or self._in_use + w.seats <= self.config.seats
        if w.key is None:
            return fits
        w.where = self._where(w.key)
        has_slot = w.where in ("device", "loading") or self._reserved[w.key] > 0
        w.blocked = not (has_slot or room_left > 0)
        if w.blocked:
            w.blocked_since = w.blocked_since or self.clock()
        else:
            w.blocked_since = None
        return fits and not w.blocked

    def _due(self) -> _Waiter | None:
        due = [
            w
            for q in self._queues.values()
            for w in q
            if w.blocked and w.bypassed >= self.config.max_bypass
        ]
        return min(due, key=lambda w: w.seq) if due else None

    def _in_turn(self):
        for tenant in sorted(self._queues, key=lambda t: self._served.get(t, -1)):
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
            pick = None
            for w in [due] if due else self._in_turn():
                if self._ready(w, room_left):
                    pick = w
                    break
            if pick is None:
                return
            if pick.key is not None and pick.where in ("host", "disk"):
                if self._reserved[pick.key] == 0:
                    room_left -= 1
                self._reserved[pick.key] += 1
            self._grant(pick)
            if self._where_cache is None:  # a nested release ended the pass
                return

    def _grant(self, w: _Waiter) -> None:
        self._remove(w)
        for other in self._in_turn():
            if other.blocked and other.seq < w.seq:
                other.bypassed += 1
                self._bypassed_total += 1
        self._in_use += w.seats
        self._grants.append(w.tenant)
        self._served[w.tenant] = next(self._grant_seq)
        waited = self.clock() - w.enqueued
        ticket = Ticket(self, w.tenant, w.key, w.seats, waited, w.where)
        for observe in self.waits:
            observe(w.where, waited)
        if w.future.done():  # cancelled: give the seats back at once
            self._release(ticket)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is w.loop:
            w.future.set_result(ticket)
        else:
            w.loop.call_soon_threadsafe(_settle, w.future, ticket, self)

    def _leave(self, tenant: str) -> None:
        self._active[tenant] -= 1
        if self._active[tenant] <= 0:
            del self._active[tenant]

    def _remove(self, w: _Waiter) -> None:
        queue = self._queues[w.tenant]
        queue.remove(w)
        if not queue:
            del self._queues[w.tenant]

    # -- the ticket's side -----------------------------------------------------------------

    def _loaded(self, ticket: Ticket, seconds: float) -> None:
        with self._lock:
            if ticket.acquired:
                return
            ticket.acquired = True
            if ticket.key is not None and ticket.where in ("host", "disk"):
                self._reserved[ticket.key] -= 1
                if self._reserved[ticket.key] <= 0:
                    del self._reserved[ticket.key]
                self._load[ticket.where].add(seconds)

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.released:
                return
            if not ticket.acquired:
                self._loaded(ticket, 0.0)
            ticket.released = True
            self._in_use -= ticket.seats
            self._leave(ticket.tenant)
            now = self.clock()
            if self._last_release is not None:
                self._interval.add(now - self._last_release)
            self._last_release = now
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
            queued = 0.0
            if ahead or self._in_use >= self.config.seats:
                queued = (ahead + 1) * (self._interval.value or 0.0)
            where = self._where(key) if key is not None else "device"
            load = self._load.get(where)
            return queued + (load.value or 0.0 if load else 0.0)

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
                recent_grants=list(self._grants),
            )

    def _prefetch(self, waiter: _Waiter) -> None:
        if waiter.key is None or waiter.where not in ("host", "disk"):
            return
        free, _ = self.residency.room()
        # Into a free slot (no eviction), else into host memory: the load overlaps the wait.
        self.residency.prefetch(waiter.key, "device" if free > 0 else "host")


def _settle(future: asyncio.Future, ticket: Ticket, admission: Admission) -> None:
    if future.done():  # the call gave up before the grant arrived
        admission._release(ticket)
    else:
        future.set_result(ticket)
