"""AdapterPool: adapters on disk, in host memory and in the engine's device slots.

    slot = pool.acquire(adapter_id)   # pinned: never evicted until released
    ...run the request with `slot`...
    pool.release(adapter_id)          # after the request's final output

Tiers: the host tier (PackedAdapter buffers, pinned when CUDA is available) is an LRU bounded
by `max_cpu_loras` and `max_cpu_bytes`; the device tier is `max_loras` slots, also LRU. A slot
with pins (running requests, or an operator's pin) is never evicted. When every slot is pinned,
`acquire` waits up to its timeout and then raises PoolExhausted, the registry's one retryable
error. Loads run on worker threads: disk → host (the loader), host → device (one copy on a side
CUDA stream), then the slot write through the SlotWriter, the only step ordered with engine
steps. Concurrent acquires of the same cold adapter share one load. The same pool serves the CPU
engine: there the host buffer is handed to the slot write as it is.

Never call `acquire` or `pin` on the engine thread when the writer hands writes to that thread:
the write would wait for the caller, and the caller for the write.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .errors import (
    AdapterLoadError,
    PinLimitReached,
    PoolClosed,
    PoolExhausted,
    RegistryError,
)
from .host_tier import HostTier, Loader
from .pool_metrics import PoolMetrics
from .slot_writer import SlotWriter
from .staging import PinnedStaging

log = logging.getLogger(__name__)
Listener = Callable[[str, Hashable, str], None]  # (event kind, adapter key, detail)


@dataclass(frozen=True)
class PoolConfig:
    """Capacities of the tiers; `max_loras` must equal the engine's slot count."""

    max_loras: int
    max_cpu_loras: int
    max_cpu_bytes: int = 16 << 30
    # the engine's slot dtype; host copies are stored in it
    dtype: torch.dtype = torch.float32
    device: str = "cpu"  # where the engine's slots live: "cpu" or "cuda[:N]"
    acquire_timeout_s: float = 10.0  # how long acquire waits while every slot is pinned
    retry_after_s: float = 1.0  # what PoolExhausted tells the client
    load_workers: int = 2
    # adapters operators may pin; default max_loras - 1, so one slot always turns over
    max_pinned: int | None = None


@dataclass
class _Entry:
    key: Hashable
    slot: int | None = None
    on_device: bool = False
    device_future: Future | None = None
    pins: int = 0
    admin_pinned: bool = False


@dataclass(frozen=True)
class EntryState:
    """One adapter the pool knows, for the admin UI."""

    key: Hashable
    slot: int | None  # set when on the device, or loading into it
    on_device: bool
    loading: bool  # into its slot
    host_bytes: int  # 0 when not in the host tier
    pins: int  # running requests + 1 if an operator pinned it
    admin_pinned: bool


class AdapterPool:
    """The host and device tiers of adapters; thread-safe."""

    def __init__(
        self,
        config: PoolConfig,
        writer: SlotWriter,
        loader: Loader,
        listener: Listener | None = None,
        metrics: PoolMetrics | None = None,
    ) -> None:
        if config.max_loras < 1:
            raise ValueError("the pool needs at least one device slot (max_loras >= 1)")
        self.config = config
        self.writer = writer
        self.loader = loader
        self.listener = listener
        self.metrics = metrics or PoolMetrics()
        self.device = torch.device(config.device)
        cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._staging = PinnedStaging(config.load_workers, pin=True) if cuda else None
        limits = (config.max_cpu_loras, config.max_cpu_bytes, config.dtype)
        self.host = HostTier(loader, *limits, self.metrics, self._emit)
        self._cond = threading.Condition()
        self._entries: dict[Hashable, _Entry] = {}
        self._device_lru: OrderedDict[Hashable, None] = OrderedDict()  # LRU first
        self._free_slots = list(range(config.max_loras))
        self._closed = False
        self._executor = ThreadPoolExecutor(
            config.load_workers, thread_name_prefix="loraplex-pool"
        )

    # -- requests -------------------------------------------------------------------------

    def acquire(self, key: Hashable, timeout: float | None = None) -> int:
        """The slot holding `key`, loading it if needed; pins it until `release(key)`.

        :param timeout: seconds to wait while every slot is pinned (default from the config).
        :raises PoolExhausted: every slot stayed pinned (retryable).
        :raises RegistryError: the load failed (AdapterCorrupt, AdapterLoadError, ...).
        """
        wait = self.config.acquire_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + wait
        events: list[tuple[str, Hashable, str]] = []
        with self._cond:
            while True:
                self._check_open()
                entry = self._entries.setdefault(key, _Entry(key))
                if entry.on_device:
                    entry.pins += 1
                    self._device_lru.move_to_end(key)
                    self.metrics.hit("device")
                    return entry.slot
                if entry.device_future is None:
                    slot = self._take_slot(events)
                    if slot is None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            self._forget_if_idle(entry)
                            if wait > 0:  # a try without a wait is no refusal
                                self.metrics.refused()
                            raise self._exhausted()
                        self._cond.wait(remaining)
                        continue
                    self._start_device_load(entry, slot)
                    self.metrics.miss("device")
                future = entry.device_future
                entry.pins += 1
                break
        self._emit(events)
        try:
            return future.result()
        except BaseException:
            with self._cond:
                entry.pins -= 1
                self._forget_if_idle(entry)
                self._cond.notify_all()
            raise

    def release(self, key: Hashable) -> None:
        """Unpin what one `acquire(key)` pinned."""
        with self._cond:
            entry = self._entries.get(key)
            if entry is None or entry.pins <= int(entry.admin_pinned):
                raise RuntimeError(f"release({key!r}) without a matching acquire")
            entry.pins -= 1
            self._cond.notify_all()

    # -- operations for the API and admin UI ------------------------------------------------

    def prefetch(self, key: Hashable, to: str = "device") -> Future:
        """Start loading `key` into the host tier or a device slot, without pinning it.

        The Future's result is the slot (device) or the host copy (host); a device prefetch
        while every slot is pinned fails at once with PoolExhausted.
        """
        if to not in ("device", "host"):
            raise ValueError("prefetch to 'device' or 'host'")
        events: list[tuple[str, Hashable, str]] = []
        with self._cond:
            self._check_open()
            entry = self._entries.setdefault(key, _Entry(key))
            if to == "host":
                self._forget_if_idle(entry)
                future, leader = self.host.start(key)
                if leader:
                    self._executor.submit(_quietly, self.host.fill, key, future)
                return future
            if entry.on_device:
                return _done(entry.slot)
            if entry.device_future is None:
                slot = self._take_slot(events)
                if slot is None:
                    self._forget_if_idle(entry)
                    failed: Future = Future()
                    failed.set_exception(self._exhausted())
                    return failed
                self._start_device_load(entry, slot)
            future = entry.device_future
        self._emit(events)
        return future

    def pin(self, key: Hashable, timeout: float | None = None) -> int:
        """Keep `key` in a device slot until `unpin(key)`; returns the slot.

        :raises PinLimitReached: `max_pinned` adapters are pinned already.
        """
        limit = self.config.max_pinned
        limit = self.config.max_loras - 1 if limit is None else limit
        with self._cond:
            pinned = sum(e.admin_pinned for e in self._entries.values())
            entry = self._entries.get(key)
            if not (entry and entry.admin_pinned) and pinned >= limit:
                raise PinLimitReached(
                    f"{pinned} adapters are pinned, the most allowed ({limit}); "
                    "unpin one first"
                )
        slot = self.acquire(key, timeout)
        with self._cond:
            entry = self._entries[key]
            if entry.admin_pinned:
                entry.pins -= 1  # pinned already: keep the one pin
            entry.admin_pinned = True
        self._emit([("pinned", key, f"slot {slot}")])
        return slot

    def unpin(self, key: Hashable) -> bool:
        """Undo `pin(key)`; False if it was not pinned."""
        with self._cond:
            entry = self._entries.get(key)
            if entry is None or not entry.admin_pinned:
                return False
            entry.admin_pinned = False
            entry.pins -= 1
            self._cond.notify_all()
        self._emit([("unpinned", key, "")])
        return True

    def evict(self, key: Hashable) -> bool:
        """Drop `key` from both tiers now; False (and nothing done) while pinned or loading."""
        events: list[tuple[str, Hashable, str]] = []
        with self._cond:
            entry = self._entries.get(key)
            if entry is not None:
                if entry.pins or entry.device_future:
                    return False
                if entry.on_device:
                    self._evict_device(entry, events)
                self._forget_if_idle(entry)
                self._cond.notify_all()
        self._emit(events)
        self.host.evict(key)
        return True

    def in_use(self, key: Hashable) -> bool:
        """Whether a request or an operator pins `key`, or a load of it is running."""
        with self._cond:
            entry = self._entries.get(key)
            busy = bool(entry and (entry.pins or entry.device_future))
        return busy or self.host.loading(key)

    def residency(self, key: Hashable) -> str:
        """Where `key` is: device, loading (into a slot), host or disk; never waits."""
        with self._cond:
            entry = self._entries.get(key)
            if entry is not None and (entry.on_device or entry.device_future):
                return "device" if entry.on_device else "loading"
        return "host" if self.host.bytes_of(key) else "disk"

    def snapshot(self) -> list[EntryState]:
        """Every adapter the pool holds, most recently used on the device last."""
        with self._cond:
            order = list(self._device_lru) + [
                k for k in self._entries if k not in self._device_lru
            ]
            return [self._state(self._entries[k]) for k in order if k in self._entries]

    def close(self) -> None:
        """Stop loading; waiting acquires fail with PoolClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosed("the adapter pool is shut down")

    def _exhausted(self) -> PoolExhausted:
        return PoolExhausted(
            f"all {self.config.max_loras} adapter slots are in use by running requests; "
            f"retry in {self.config.retry_after_s:g} s",
            self.config.retry_after_s,
        )

    def _state(self, e: _Entry) -> EntryState:
        loading, host_bytes = e.device_future is not None, self.host.bytes_of(e.key)
        return EntryState(
            e.key, e.slot, e.on_device, loading, host_bytes, e.pins, e.admin_pinned
        )

    def _take_slot(self, events: list) -> int | None:
        if self._free_slots:
            return self._free_slots.pop(0)
        for key in self._device_lru:
            victim = self._entries[key]
            if victim.pins == 0:
                slot = victim.slot
                self._evict_device(victim, events)
                self._free_slots.remove(slot)
                return slot
        return None

    def _evict_device(self, entry: _Entry, events: list) -> None:
        slot = entry.slot
        del self._device_lru[entry.key]
        entry.on_device, entry.slot = False, None
        self._free_slots.append(slot)
        self._free_slots.sort()
        self.metrics.evicted("device")
        events.append(("evicted", entry.key, f"from slot {slot}"))

    def _forget_if_idle(self, entry: _Entry) -> None:
        if not (entry.pins or entry.on_device or entry.device_future):
            self._entries.pop(entry.key, None)

    def _start_device_load(self, entry: _Entry, slot: int) -> None:
        entry.slot = slot
        entry.device_future = Future()
        self._executor.submit(self._load_to_device, entry, slot, entry.device_future)

    def _load_to_device(self, entry: _Entry, slot: int, future: Future) -> None:
        events: list[tuple[str, Hashable, str]] = []
        try:
            packed = self.host.get(entry.key)
            staged = packed
            if self.device.type == "cuda":
                started = time.perf_counter()
                staged = packed.to_device(self.device, self._stream, self._staging)
                self.metrics.moved(
                    "host_to_device", packed.num_bytes, time.perf_counter() - started
                )
            started = time.perf_counter()
            self.writer.write_slot(slot, staged.weights())
            self.metrics.moved(
                "slot_write", packed.num_bytes, time.perf_counter() - started
            )
        except Exception as exc:  # noqa: BLE001 - handed to every waiter, never lost
            error = exc
            if not isinstance(exc, RegistryError):
                error = AdapterLoadError(
                    f"loading adapter {entry.key!r} into slot {slot} failed: {exc!r}"
                )
            self.metrics.failed("device")
            with self._cond:
                entry.device_future, entry.slot = None, None
                self._free_slots.append(slot)
                self._free_slots.sort()
                self._forget_if_idle(entry)
                self._cond.notify_all()
            future.set_exception(error)
            return
        with self._cond:
            entry.device_future, entry.on_device = None, True
            self._device_lru[entry.key] = None
            self._cond.notify_all()
        events.append(("loaded", entry.key, f"into slot {slot}"))
        future.set_result(slot)
        self._emit(events)

    def _emit(self, events: list[tuple[str, Hashable, str]]) -> None:
        if self.listener is None:
            return
        for kind, key, detail in events:
            try:
                self.listener(kind, key, detail)
            except Exception:
                log.exception("pool listener failed on %s %r", kind, key)


def _quietly(fn: Callable, *args: object) -> None:
    with contextlib.suppress(Exception):  # the error is in the caller's Future already
        fn(*args)


def _done(value: object) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
