"""PoolMetrics: the pool's counters and latency histograms, in plain Python.

Counters are keyed by tier ("device", "host") or by move ("disk_to_host", "host_to_device",
"slot_write"); histograms have Prometheus-style cumulative buckets so the API can export them
as they are.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass
class Histogram:
    """Observations counted into buckets by upper bound (le), plus their count and sum."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    count: int = 0
    total: float = 0.0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.bounds)
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.count += 1
        self.total += value

    def snapshot(self) -> dict:
        counts = self.counts or [0] * len(self.bounds)
        return {
            "buckets": dict(zip(self.bounds, counts, strict=True)),
            "count": self.count,
            "sum": self.total,
        }


class PoolMetrics:
    """Hits, misses and evictions per tier; loads, latency and bytes per move. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits: dict[str, int] = defaultdict(int)
        self.misses: dict[str, int] = defaultdict(int)
        self.evictions: dict[str, int] = defaultdict(int)
        self.loads: dict[str, int] = defaultdict(int)
        self.failures: dict[str, int] = defaultdict(int)
        self.bytes_moved: dict[str, int] = defaultdict(int)
        self.latency: dict[str, Histogram] = defaultdict(Histogram)
        self.exhausted = 0  # acquires refused because every slot stayed pinned

    def hit(self, tier: str) -> None:
        with self._lock:
            self.hits[tier] += 1

    def miss(self, tier: str) -> None:
        with self._lock:
            self.misses[tier] += 1

    def evicted(self, tier: str) -> None:
        with self._lock:
            self.evictions[tier] += 1

    def moved(self, move: str, num_bytes: int, seconds: float) -> None:
        """One finished move of `num_bytes` taking `seconds`."""
        with self._lock:
            self.loads[move] += 1
            self.bytes_moved[move] += num_bytes
            self.latency[move].observe(seconds)

    def failed(self, move: str) -> None:
        with self._lock:
            self.failures[move] += 1

    def refused(self) -> None:
        with self._lock:
            self.exhausted += 1

    def snapshot(self) -> dict:
        """Everything, as plain dicts (for /metrics and the admin UI)."""
        with self._lock:
            return {
                "hits": dict(self.hits),
                "misses": dict(self.misses),
                "evictions": dict(self.evictions),
                "loads": dict(self.loads),
                "failures": dict(self.failures),
                "bytes_moved": dict(self.bytes_moved),
                "latency_seconds": {k: h.snapshot() for k, h in self.latency.items()},
                "exhausted": self.exhausted,
            }
