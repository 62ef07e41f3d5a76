"""HostTier: adapters held in host memory (pageable; moves to the GPU stage through
staging.py), LRU-bounded.

Bounded by a count and by bytes; loads from disk go through the loader once per adapter however
many threads ask at the same time. An adapter bigger than the byte budget is still loaded and
handed out, just not kept.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future

import torch

from loraplex.platform import LoraWeights

from .packed import PackedAdapter, pack
from .pool_metrics import PoolMetrics

Loader = Callable[
    [Hashable], LoraWeights
]  # disk → host; raises RegistryError subclasses
Emit = Callable[[list[tuple[str, Hashable, str]]], None]


class HostTier:
    """The host-memory LRU of packed adapters. Thread-safe."""

    def __init__(
        self,
        loader: Loader,
        max_count: int,
        max_bytes: int,
        dtype: torch.dtype,
        metrics: PoolMetrics,
        emit: Emit,
    ) -> None:
        self.loader = loader
        self.max_count, self.max_bytes = max_count, max_bytes
        self.dtype = dtype
        self.metrics, self.emit = metrics, emit
        self._lock = threading.Lock()
        self._held: OrderedDict[Hashable, PackedAdapter] = OrderedDict()  # LRU first
        self._loading: dict[Hashable, Future] = {}
        self.num_bytes = 0

    def get(self, key: Hashable) -> PackedAdapter:
        """The host copy of `key`, loading it (once, for all callers) on a miss."""
        future, leader = self.start(key)
        return self.fill(key, future) if leader else future.result()

    def start(self, key: Hashable) -> tuple[Future, bool]:
        """(a Future of the host copy, whether the caller must run `fill`)."""
        with self._lock:
            if key in self._held:
                self._held.move_to_end(key)
                self.metrics.hit("host")
                done: Future = Future()
                done.set_result(self._held[key])
                return done, False
            if key in self._loading:
                return self._loading[key], False
            self.metrics.miss("host")
            future: Future = Future()
            self._loading[key] = future
            return future, True

    def fill(self, key: Hashable, future: Future) -> PackedAdapter:
        """Load `key` from disk for everyone waiting on `future`."""
        try:
            started = time.perf_counter()
            packed = pack(self.loader(key), self.dtype, pin=False)
            self.metrics.moved(
                "disk_to_host", packed.num_bytes, time.perf_counter() - started
            )
        except BaseException as exc:
            self.metrics.failed("host")
            with self._lock:
                del self._loading[key]
            future.set_exception(exc)
            raise
        events: list[tuple[str, Hashable, str]] = []
        with self._lock:
            del self._loading[key]
            if self.max_count > 0 and packed.num_bytes <= self.max_bytes:
                self._held[key] = packed
                self.num_bytes += packed.num_bytes
                while (
                    len(self._held) > self.max_count or self.num_bytes > self.max_bytes
                ):
                    self._drop(next(iter(self._held)), events)
        future.set_result(packed)
        self.emit(events)
        return packed

    def evict(self, key: Hashable) -> None:
        """Forget the host copy of `key`, if any (an in-flight load is left alone)."""
        events: list[tuple[str, Hashable, str]] = []
        with self._lock:
            if key in self._held:
                self._drop(key, events)
        self.emit(events)

    def holds(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._held

    def loading(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._loading

    def bytes_of(self, key: Hashable) -> int:
        with self._lock:
            packed = self._held.get(key)
            return packed.num_bytes if packed is not None else 0

    def keys(self) -> list[Hashable]:
        """Held keys, least recently used first."""
        with self._lock:
            return list(self._held)

    def _drop(self, key: Hashable, events: list) -> None:
        packed = self._held.pop(key)
        self.num_bytes -= packed.num_bytes
        self.metrics.evicted("host")
        events.append(("evicted", key, "from host memory"))
