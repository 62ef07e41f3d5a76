"""What admission is made of: its config, the residency it asks, its refusals, its tickets,
the tenants' token buckets and the running estimates behind the expected wait."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .admission import Admission


@dataclass(frozen=True)
class AdmissionConfig:
    """Limits of admission; zero token rate means no token limit."""

    seats: int = 64  # engine requests admitted at once (max_num_seqs)
    max_queued: int = 256  # calls waiting beyond the seats before 503
    max_per_tenant: int = 64  # a tenant's calls admitted or waiting at once (429)
    tenant_token_rate: float = 0.0  # prompt + max_tokens per second per tenant
    tenant_token_burst: int = 0  # bucket size; 0 = ten seconds of the rate
    max_bypass: int = 16  # times a call waiting for a slot may be overtaken
    adapter_wait_s: float = 10.0  # how long a call waits for a slot before 503
    # A waiting call may take the places of running requests of a tenant that runs more
    # (fair_share.py); the engine client must preempt them (Submission.displaces).
    preempt: bool = False


class AdapterResidency(Protocol):
    """Where adapters are, as admission sees it (the registry's pool implements it)."""

    def residency(self, key: Hashable) -> str:
        """ "device", "loading" (into a slot), "host" or "disk"."""

    def room(self) -> tuple[int, int]:
        """(free device slots, slots whose adapter nothing pins)."""

    def prefetch(self, key: Hashable, to: str) -> None:
        """Start loading `key` to "host" or "device" without pinning it; never raises."""

    def victim(self) -> Hashable | None:
        """The adapter in a device slot that should free first (fewest pins, not pinned
        by an operator), or None."""


class AllResident:
    """The residency of a resolver that does not know its pool: everything is resident."""

    def residency(self, key: Hashable) -> str:
        return "device"

    def room(self) -> tuple[int, int]:
        return (1 << 30, 0)

    def prefetch(self, key: Hashable, to: str) -> None:
        return None

    def victim(self) -> Hashable | None:
        return None


class Refused(Exception):
    """A call admission will not take: `reason` (a metric label), status, Retry-After."""

    def __init__(
        self, reason: str, status: int, message: str, retry_after_s: float, code=None
    ) -> None:
        super().__init__(message)
        self.reason, self.status, self.code = reason, status, code
        self.retry_after = max(1, math.ceil(retry_after_s))

    @classmethod
    def of(cls, reason: str, retry_after_s: float) -> Refused:
        """One of admission's own refusals (a tenant's token rate has its own message)."""
        status, message, code = _REFUSALS[reason]
        return cls(reason, status, message, retry_after_s, code)


_REFUSALS = {  # reason → (status, message, code)
    "tenant_limit": (429, "too many concurrent requests for this key", None),
    "queue_full": (503, "too many requests are queued; retry shortly", None),
    "adapter_wait": (
        503,
        "every adapter slot is in use by running requests; retry shortly",
        "pool_exhausted",
    ),
}


class ClientGone(Exception):
    """The client disconnected while its call waited."""


@dataclass(eq=False)
class Waiter:
    """A call waiting for its turn."""

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


@dataclass(eq=False)
class Ticket:
    """An admitted call; `release` (idempotent) gives its seats back."""

    admission: Admission
    waiter: Waiter
    tenant: str
    key: Hashable | None
    seats: int
    waited_s: float
    where: str  # the adapter's residency when the call was admitted
    acquired: bool = False
    released: bool = False
    blocked_since: float | None = None  # it waited for a slot from then
    # Fair share (fair_share.py): its engine requests once queued, those of them that gave
    # their places to other calls, and the (call, request id) whose places it may take.
    request_ids: tuple[str, ...] = ()
    started: bool = False
    displaced: set[str] = field(default_factory=set)
    displaces: list[tuple[Ticket, str]] = field(default_factory=list)
    priority: int = 0  # the engine's: 0 within the tenant's fair share, 1 beyond

    def start(self, request_ids) -> list[str]:
        """The call's engine requests are `request_ids`; returns the ids of the requests
        whose places they may take, in order: the engine client preempts the first ones
        it finds running, one per request of this call."""
        return self.admission._start(self, request_ids)

    def loaded(self, seconds: float) -> None:
        """The adapter is pinned (it took `seconds`): its reservation of a slot ends."""
        self.admission._loaded(self, seconds)

    def release(self) -> None:
        self.admission._release(self)


@dataclass
class AdmissionStats:
    """A snapshot for metrics and the admin views."""

    waiting: int
    seats_in_use: int
    seats: int
    waiting_by_tenant: dict[str, int]
    active_by_tenant: dict[str, int]
    expected_wait_s: float
    bypassed_total: int
    held_for_slot: bool  # a call is due: nothing else starts until it gets a slot
    preempted_total: int = 0  # engine requests that gave their places (fair share)
    # The last grants, oldest first: (tenant, the other tenants that had calls waiting).
    recent_grants: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)


class TokenBuckets:
    """Per-tenant token buckets: `rate` tokens a second, up to `burst` saved."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst or rate * 10
        self._levels: dict[str, tuple[float, float]] = {}  # tenant → (level, time)

    def take(self, tenant: str, tokens: int, now: float) -> None:
        """Spend `tokens`, or raise Refused (429) with the seconds until they are there."""
        level, then = self._levels.get(tenant, (self.burst, now))
        level = min(self.burst, level + (now - then) * self.rate)
        needed = min(tokens, self.burst)  # a bigger call waits for a full bucket
        if level < needed:
            self._levels[tenant] = (level, now)
            wait = (needed - level) / self.rate
            raise Refused(
                "token_rate",
                429,
                f"this key is over its {self.rate:g} tokens/s (prompt + max_tokens); "
                f"retry in {math.ceil(wait)} s",
                wait,
            )
        self._levels[tenant] = (level - tokens, now)


class Ewma:
    """An exponentially weighted mean (None until the first sample)."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.value: float | None = None

    def add(self, sample: float) -> None:
        old = self.value
        self.value = (
            sample if old is None else (1 - self.weight) * old + self.weight * sample
        )


class WaitEstimate:
    """What the expected wait is made of: the rate seats free, the adapters' load times."""

    def __init__(self) -> None:
        self.interval = Ewma()  # seconds between two freed seats
        self.last_freed: float | None = None
        self.load = {"host": Ewma(), "disk": Ewma()}  # adapter load seconds, by source

    def freed(self, now: float) -> None:
        if self.last_freed is not None:
            self.interval.add(now - self.last_freed)
        self.last_freed = now

    def loaded(self, where: str, seconds: float) -> None:
        self.load[where].add(seconds)

    def seconds(self, ahead: int, full: bool, where: str) -> float:
        """`ahead` calls before this one (`full`: no seat free), its adapter `where`."""
        queued = (ahead + 1) * (self.interval.value or 0.0) if ahead or full else 0.0
        load = self.load.get(where)
        return queued + (load.value or 0.0 if load else 0.0)


def deliver(waiter: Waiter, ticket: Ticket, admission: Admission) -> None:
    """Hand the ticket to the waiting call, on its own event loop."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is waiter.loop:
        waiter.future.set_result(ticket)
    else:
        waiter.loop.call_soon_threadsafe(settle, waiter.future, ticket, admission)


def settle(future: asyncio.Future, ticket: Ticket, admission: Admission) -> None:
    if future.done():  # the call gave up before the grant arrived
        admission._release(ticket)
    else:
        future.set_result(ticket)
