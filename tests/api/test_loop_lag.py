"""The event loop's lag: observed every tick by LoopLagMonitor, started with the app."""

from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client import CollectorRegistry, Histogram

from loraplex.api.loop_lag import LoopLagMonitor

ADMIN = {"Authorization": "Bearer key-admin"}  # conftest.KEYS


def _histogram() -> Histogram:
    return Histogram(
        "lag_seconds",
        "test",
        buckets=(0.05, 0.1, 0.2, 0.4),
        registry=CollectorRegistry(),
    )


def _counts(histogram: Histogram) -> tuple[float, float]:
    """(observations, observations above 0.1 s)."""
    samples = {
        (s.name, s.labels.get("le")): s.value for s in histogram.collect()[0].samples
    }
    count = samples[("lag_seconds_count", None)]
    return count, count - samples[("lag_seconds_bucket", "0.1")]


def test_a_blocked_loop_shows_as_one_late_tick():
    histogram = _histogram()

    async def scenario():
        monitor = LoopLagMonitor(histogram, tick_s=0.01)
        monitor.start()
        await asyncio.sleep(0.1)
        before = _counts(histogram)
        time.sleep(0.3)  # noqa: ASYNC251 - the point: a handler that holds the loop
        await asyncio.sleep(0.1)
        await monitor.stop()
        return before, _counts(histogram)

    (count_before, late_before), (count_after, late_after) = asyncio.run(scenario())
    assert count_before >= 3 and late_before == 0
    assert late_after == 1  # the one tick that waited behind the 0.3 s block
    assert count_after > count_before + 1


def test_stopping_ends_the_ticks():
    histogram = _histogram()

    async def scenario():
        monitor = LoopLagMonitor(histogram, tick_s=0.01)
        monitor.start()
        monitor.start()  # idempotent: one task
        await asyncio.sleep(0.05)
        await monitor.stop()
        stopped_at = _counts(histogram)[0]
        await asyncio.sleep(0.05)
        return stopped_at, _counts(histogram)[0]

    stopped_at, later = asyncio.run(scenario())
    assert stopped_at > 0 and later == stopped_at


def test_the_served_app_exports_its_loop_lag(server):
    def lag_count() -> float:
        text = httpx.get(f"{server}/metrics", headers=ADMIN).text
        line = next(
            x for x in text.splitlines()
            if x.startswith("loraplex_event_loop_lag_seconds_count")
        )  # fmt: skip
        return float(line.split()[-1])

    first = lag_count()
    time.sleep(0.2)
    assert lag_count() > first
