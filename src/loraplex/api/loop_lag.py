"""LoopLagMonitor: how late the API's event loop wakes for a short timer.

Every HTTP request read, every SSE chunk written and every refusal waits its turn on the one
event loop, whose thread also shares the interpreter lock with the engine thread. A request's
setup and delivery timers start and stop on that loop, so a wait for the loop itself, before a
request is parsed or after its first token is handed over, shows in no per-request figure; this
series does (the sixth to eighth sessions' fairness runs left 200 ms of the tail unexplained).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from prometheus_client import Histogram

# Ticks this often: a lag is observed each tick (100 a second; the tick itself is one timer).
TICK_S = 0.01


class LoopLagMonitor:
    """Observes into `histogram`, every TICK_S, how much later than asked the loop woke."""

    def __init__(self, histogram: Histogram, tick_s: float = TICK_S) -> None:
        self.histogram = histogram
        self.tick_s = tick_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start ticking on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        observe = self.histogram.observe
        while True:
            asked = time.monotonic() + self.tick_s
            await asyncio.sleep(self.tick_s)
            observe(max(0.0, time.monotonic() - asked))
