"""Recent history of the engine's load, for the overview's live charts.

Prometheus counters only grow, so a rate or a recent latency needs two readings. The UI keeps
a short ring of readings, taken when a page or its JSON twin is asked for (at most one per
`min_interval_s`): no background thread, and nothing is measured while nobody looks.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .metrics_read import MetricsReading, bucket_delta, quantile

LATENCY_WINDOW_S = 60.0  # latency quantiles are over the last minute
RATE_WINDOW_S = 10.0  # tokens/s over the last ten seconds
CHART_LATENCY_WINDOW_S = (
    10.0  # each chart point: latency over the ten seconds before it
)


@dataclass(frozen=True)
class Point:
    """One reading, stamped with wall-clock time."""

    at: float
    reading: MetricsReading


class History:
    """A ring of readings; thread-safe."""

    def __init__(
        self,
        keep_s: float = 600.0,
        min_interval_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keep_s = keep_s
        self.min_interval_s = min_interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._points: deque[Point] = deque()

    def record(self, read: Callable[[], MetricsReading]) -> list[Point]:
        """Take a reading unless the last is recent; returns the points, oldest first."""
        now = self.clock()
        with self._lock:
            if not self._points or now - self._points[-1].at >= self.min_interval_s:
                self._points.append(Point(now, read()))
            while now - self._points[0].at > self.keep_s:
                self._points.popleft()
            return list(self._points)


def _base(points: list[Point], i: int, window_s: float) -> Point:
    """The newest point at least `window_s` before points[i] (else the oldest)."""
    base = points[0]
    for p in points[:i]:
        if p.at <= points[i].at - window_s:
            base = p
    return base


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def latency(points: list[Point], i: int, window_s: float = LATENCY_WINDOW_S) -> dict:
    """TTFT and ITL p50/p99 in ms over the window ending at points[i] (None: no data)."""
    now, base = points[i].reading, _base(points, i, window_s).reading
    ttft = bucket_delta(now.ttft, base.ttft) if i else now.ttft
    itl = bucket_delta(now.itl, base.itl) if i else now.itl
    return {
        "ttft_p50_ms": _ms(quantile(0.5, ttft)),
        "ttft_p99_ms": _ms(quantile(0.99, ttft)),
        "itl_p50_ms": _ms(quantile(0.5, itl)),
        "itl_p99_ms": _ms(quantile(0.99, itl)),
    }


def tokens_per_s(points: list[Point], i: int, window_s: float = RATE_WINDOW_S):
    """Generated tokens per second over the window ending at points[i]."""
    base = _base(points, i, window_s)
    seconds = points[i].at - base.at
    if seconds <= 0:
        return None
    delta = points[i].reading.generation_tokens - base.reading.generation_tokens
    return round(delta / seconds, 2)


def engine_time(
    points: list[Point], i: int, window_s: float = LATENCY_WINDOW_S
) -> dict:
    """Where the engine thread's time went over the window ending at points[i]: per kind of
    step its count, mean wall ms, the host part of it (not waiting for the GPU) and share of
    the window; and the shares outside steps."""
    now, base = points[i].reading, _base(points, i, window_s).reading
    seconds = points[i].at - _base(points, i, window_s).at
    kinds = []
    for kind, count in sorted(now.step_counts.items()):
        steps = count - base.step_counts.get(kind, 0.0)
        busy = now.step_seconds.get(kind, 0.0) - base.step_seconds.get(kind, 0.0)
        wait = now.step_gpu_wait.get(kind, 0.0) - base.step_gpu_wait.get(kind, 0.0)
        if steps > 0:
            kinds.append(
                {
                    "kind": kind,
                    "steps": int(steps),
                    "mean_ms": _ms(busy / steps),
                    "host_ms": _ms((busy - wait) / steps),
                    "share": round(busy / seconds, 4) if seconds > 0 else None,
                }
            )
    outside = {
        activity: round((value - base.thread_seconds.get(activity, 0.0)) / seconds, 4)
        if seconds > 0
        else None
        for activity, value in sorted(now.thread_seconds.items())
    }
    return {"window_s": round(seconds, 1), "steps": kinds, "outside_steps": outside}


def series(points: list[Point]) -> dict:
    """Chart data: one list per measure, aligned on `t` (seconds before the newest point)."""
    out: dict[str, list] = {
        "t": [],
        "tokens_per_s": [],
        "running": [],
        "waiting": [],
        "ttft_p50_ms": [],
        "ttft_p99_ms": [],
        "itl_p50_ms": [],
        "itl_p99_ms": [],
    }
    if not points:
        return out
    newest = points[-1].at
    for i, p in enumerate(points):
        out["t"].append(round(p.at - newest, 1))
        out["tokens_per_s"].append(tokens_per_s(points, i, 0.0))  # since the last point
        out["running"].append(p.reading.running)
        out["waiting"].append(p.reading.waiting)
        for key, value in latency(points, i, CHART_LATENCY_WINDOW_S).items():
            out[key].append(value)
    return out
