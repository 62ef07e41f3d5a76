"""Fairness between tenants over the engine's places: which running requests a waiting call
may take the places of.

When every place is taken, a tenant's call need not wait for another tenant's requests to
end: it starts at once, and that tenant's newest requests are preempted (recomputed once a
place frees). The tenant giving places is the one running the most, and it gives one when

- it would still run at least as many as the tenant taking it, and over the last seconds
  (`Usage`) it held no fewer places (max-min fairness: tenants converge to equal shares
  and never trade places back and forth), or
- over the last seconds the taker held at least one place fewer than the giver even
  counting this call, and the giver keeps a request running: a tenant that sends less than
  the other is served first, its bursts included (and not taken back).

A tenant alone never loses a place. Requests that never gave their place go first; one that
did may give it again once it runs again, never while admission counts it as waiting. (It
runs at least one step in between: one whose recompute needs more than a step's token
budget may be cut again before it samples, as with preemption for KV blocks.)

Calls also get an engine priority (`priority`): 0 while their tenant, with them, holds no
more than an equal share of the places among the tenants running now or lately, 1 beyond.
The engine computes priority-0 prompts ahead of the prompts of priority 1, so a tenant
within its share does not wait behind a flooding tenant's prefills for its first token.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable

from .admission_types import Ticket


class Usage:
    """Places held per tenant, averaged over about `tau` seconds (exponentially)."""

    def __init__(self, tau: float = 2.0) -> None:
        self.tau = tau
        self._levels: dict[str, tuple[float, int, float]] = {}  # (mean, held, time)

    def value(self, tenant: str, now: float) -> float:
        mean, held, then = self._levels.get(tenant, (0.0, 0, now))
        return held + (mean - held) * math.exp(-(now - then) / self.tau)

    def tenants(self) -> list[str]:
        """The tenants holding places now or lately."""
        return list(self._levels)

    def change(self, tenant: str, seats: int, now: float) -> None:
        held = self._levels.get(tenant, (0.0, 0, now))[1] + seats
        mean = self.value(tenant, now)
        if held == 0 and mean < 1e-3:
            self._levels.pop(tenant, None)
        else:
            self._levels[tenant] = (mean, held, now)


class FairShare:
    """The calls admitted and not released, oldest first, and what they displaced."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.granted: list[Ticket] = []
        self.usage = Usage()
        # Requests that gave their places, oldest first (the engine queues them last, so
        # they run again in this order): those beyond the places are still waiting.
        self._displaced: deque[tuple[Ticket, str]] = deque()
        self.preempted_total = 0  # engine requests that gave their places

    def parked(self, in_use: int, places: int) -> list[tuple[Ticket, str]]:
        """The requests waiting in the engine after giving their places: the newest
        `in_use - places` of those that gave one."""
        parked = max(0, in_use - places)
        return list(self._displaced)[len(self._displaced) - parked :]

    def running(self, in_use: int, places: int) -> Counter[str]:
        """Engine places per tenant: its admitted requests, less those parked."""
        counts: Counter[str] = Counter()
        for ticket in self.granted:
            counts[ticket.tenant] += ticket.seats
        for ticket, _ in self.parked(in_use, places):
            counts[ticket.tenant] -= 1
        return counts

    def pick(
        self, tenant: str, seats: int, in_use: int, places: int
    ) -> list[tuple[Ticket, str]]:
        """Where a call of `tenant` needing `seats` places may take them (the module's
        rules): the running requests of the tenant running the most, in the order they
        should give their places (never displaced before first, then the newest); the
        engine preempts the first `seats` of them it finds running. Empty: it waits."""
        counts = self.running(in_use, places)
        others = [t for t in counts if t != tenant]
        if not others:
            return []
        rich = max(others, key=counts.__getitem__)
        now = self.clock()
        used, theirs = self.usage.value(tenant, now), self.usage.value(rich, now)
        max_min = counts[rich] - seats >= counts[tenant] + seats and used <= theirs
        if not max_min and (used + seats > theirs or counts[rich] <= seats):
            return []
        parked = set(self.parked(in_use, places))
        candidates = [
            (ticket, i)
            for ticket in reversed(self.granted)
            if ticket.tenant == rich
            for i in reversed(ticket.request_ids)
            if (ticket, i) not in parked
        ]
        candidates.sort(key=lambda entry: entry[1] in entry[0].displaced)
        return candidates if len(candidates) >= seats else []

    def priority(self, tenant: str, seats: int, in_use: int, places: int) -> int:
        """The engine priority of a call of `tenant` needing `seats` places (the module's
        rules), decided before it is added."""
        counts = self.running(in_use, places)
        now = self.clock()
        # Lately: half a place or more over the last seconds, so that a steady tenant
        # between two calls still counts.
        sharing = {t for t, n in counts.items() if n > 0} | {tenant}
        sharing |= {t for t in self.usage.tenants() if self.usage.value(t, now) >= 0.5}
        return 0 if (counts[tenant] + seats) * len(sharing) <= places else 1

    def add(self, ticket: Ticket, candidates, in_use: int, places: int) -> None:
        """`ticket` was admitted, in the places of requests among `candidates` (from
        `pick`); the first ones are counted as displaced. `in_use`: places taken before
        it, for its priority."""
        ticket.priority = self.priority(ticket.tenant, ticket.seats, in_use, places)
        self.granted.append(ticket)
        self.usage.change(ticket.tenant, ticket.seats, self.clock())
        ticket.displaces = list(candidates)
        for victim, i in ticket.displaces[: ticket.seats if candidates else 0]:
            victim.displaced.add(i)
            self._displaced.append((victim, i))

    def started(self, ticket: Ticket, request_ids) -> list[str]:
        """The call's engine requests are `request_ids`: the requests whose places they
        may take, in order (the engine preempts the first running ones, one each)."""
        ticket.request_ids = tuple(request_ids)
        ticket.started = True
        if ticket.displaces:
            self.preempted_total += ticket.seats
        return [i for _, i in ticket.displaces]

    def end(self, ticket: Ticket) -> None:
        """The call gave its places back; requests it was to displace and never did
        keep theirs."""
        if ticket not in self.granted:
            return
        self.granted.remove(ticket)
        self.usage.change(ticket.tenant, -ticket.seats, self.clock())
        entries = list(self._displaced)
        if not ticket.started:  # it never took them: the victims' last entries go
            for victim, i in ticket.displaces[: ticket.seats]:
                at = [n for n, entry in enumerate(entries) if entry == (victim, i)]
                if at:
                    del entries[at[-1]]
                if (victim, i) not in entries:
                    victim.displaced.discard(i)
        ticket.displaces = []
        self._displaced = deque((v, i) for v, i in entries if v is not ticket)
