"""PinnedStaging: a few reusable page-locked buffers that host → device copies pass through.

The host tier keeps adapters in ordinary (pageable) memory, and each move to the GPU first
copies the adapter into one of these buffers, then sends it asynchronously from there. Why not
pin every host copy, as the tier once did: pinning is a driver call (cudaHostAlloc) that
page-locks every page of an 88 MB adapter on each load from disk, at the rate adapters arrive,
and pins up to the whole host budget (16 GiB by default) where the host's own paging cannot
reach it. In the served runs of 2026-11-27 decode steps ran slower while loads from disk were
under way, by an estimated 50-120 ms of step time per load (docs/benchmarks.md); per-load
pinning is one suspect, removed here, not yet measured. The price is one host memcpy per move
(a few ms for 88 MB, off the engine's thread). The buffers grow to the largest adapter seen and
are then reused: one cudaHostAlloc per buffer and size for the life of the server.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch


class PinnedStaging:
    """`count` reusable host buffers (pinned when `pin`), lent one per copy. Thread-safe:
    a borrower waits while all are lent."""

    def __init__(self, count: int, pin: bool) -> None:
        if count < 1:
            raise ValueError("PinnedStaging needs at least one buffer")
        self.pin = pin
        self._free: list[torch.Tensor] = [
            torch.empty(0, dtype=torch.uint8) for _ in range(count)
        ]
        self._cond = threading.Condition()
        self.allocations = 0  # buffers (re)allocated so far: one per growth

    @contextlib.contextmanager
    def borrow(self, num_bytes: int) -> Iterator[torch.Tensor]:
        """A [num_bytes] uint8 view of a lent buffer, returned to the pool on exit. The caller
        must be done with it (its copies finished) before leaving the block."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._free))
            buffer = self._free.pop()
        try:
            if buffer.numel() < num_bytes:
                buffer = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=self.pin)
                with self._cond:
                    self.allocations += 1
            yield buffer[:num_bytes]
        finally:
            with self._cond:
                self._free.append(buffer)
                self._cond.notify()
