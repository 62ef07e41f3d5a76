"""AdapterPool with a fake engine: LRU order, pins, exhaustion, one load per adapter, metrics."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from registry_fakes import FakeLoader, FakeWriter, weights_for

from loraplex.adapters_registry import (
    AdapterCorrupt,
    AdapterLoadError,
    AdapterPool,
    PinLimitReached,
    PoolClosed,
    PoolConfig,
    PoolExhausted,
)
from loraplex.adapters_registry.packed import pack
from loraplex.platform import LoraModuleWeights, LoraWeights


def make_pool(max_loras=2, max_cpu_loras=8, loader=None, writer=None, **options):
    loader = loader or FakeLoader()
    writer = writer or FakeWriter()
    events: list = []
    pool = AdapterPool(
        PoolConfig(max_loras=max_loras, max_cpu_loras=max_cpu_loras, **options),
        writer,
        loader,
        listener=lambda kind, key, detail: events.append((kind, key)),
    )
    return pool, loader, writer, events


def use(pool: AdapterPool, key) -> int:
    slot = pool.acquire(key)
    pool.release(key)
    return slot


def test_device_slots_are_evicted_least_recently_used_first():
    pool, _loader, writer, events = make_pool(max_loras=2)
    s1, s2 = use(pool, 1), use(pool, 2)
    assert s1 != s2
    assert use(pool, 1) == s1  # a hit makes 1 the most recent
    s3 = use(pool, 3)  # evicts 2, the least recently used
    assert s3 == s2 and writer.slots == {s1: 1, s3: 3}
    assert use(pool, 1) == s1 and len(writer.writes) == 3
    assert ("evicted", 2) in events
    assert [e.key for e in pool.snapshot() if e.on_device] == [3, 1]
    m = pool.metrics.snapshot()
    assert m["hits"]["device"] == 2 and m["misses"]["device"] == 3
    assert m["evictions"] == {"device": 1}


def test_host_tier_is_lru_by_count_and_by_bytes():
    pool, loader, _, _ = make_pool(max_loras=1, max_cpu_loras=2)
    for key in (1, 2, 3):
        use(pool, key)
    assert pool.host.keys() == [2, 3] and loader.calls == {1: 1, 2: 1, 3: 1}
    use(pool, 2)  # from host memory, not from disk
    assert loader.calls[2] == 1
    use(pool, 1)  # evicted from the host tier: read again
    assert loader.calls[1] == 2 and pool.host.keys() == [2, 1]

    one = pack(weights_for(0), torch.float32, pin=False).num_bytes
    pool, loader, _writer, _ = make_pool(max_loras=1, max_cpu_bytes=one * 3 // 2)
    use(pool, 1)
    use(pool, 2)
    assert pool.host.keys() == [2] and pool.host.num_bytes == one


def test_pinned_slots_survive_eviction_pressure():
    pool, _loader, writer, _ = make_pool(max_loras=3)
    held = pool.acquire(1)  # a running request
    pinned = pool.pin(2)  # an operator's pin
    for key in range(3, 40):
        use(pool, key)
    assert writer.slots[held] == 1 and writer.slots[pinned] == 2
    assert [s for s, _ in writer.writes].count(held) == 1
    assert [s for s, _ in writer.writes].count(pinned) == 1
    assert pool.acquire(1) == held and pool.acquire(2) == pinned


def test_every_slot_pinned_gives_the_retryable_error():
    pool, loader, _writer, _ = make_pool(max_loras=2, retry_after_s=2.0)
    s1 = pool.acquire(1)
    pool.acquire(2)
    started = time.monotonic()
    with pytest.raises(PoolExhausted, match="all 2 adapter slots are in use") as caught:
        pool.acquire(3, timeout=0.1)
    assert 0.1 <= time.monotonic() - started < 2
    assert caught.value.retryable and caught.value.retry_after_s == 2.0
    with pytest.raises(PoolExhausted):
        pool.prefetch(3).result()
    assert pool.metrics.snapshot()["exhausted"] == 1
    assert 3 not in loader.calls  # nothing was loaded for a refused request
    pool.release(1)
    assert pool.acquire(3, timeout=0) == s1


def test_a_waiting_acquire_gets_the_first_slot_released():
    pool, loader, writer, _ = make_pool(max_loras=1)
    slot = pool.acquire(1)
    result = {}
    waiter = threading.Thread(
        target=lambda: result.update(slot=pool.acquire(2, timeout=5))
    )
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive() and 2 not in loader.calls
    pool.release(1)
    waiter.join(5)
    assert result["slot"] == slot and writer.slots[slot] == 2


def test_concurrent_acquires_of_one_cold_adapter_load_it_once():
    pool, loader, writer, _ = make_pool(max_loras=2, loader=FakeLoader(delay=0.3))
    barrier = threading.Barrier(8)
    slots = []

    def request():
        barrier.wait()
        slots.append(pool.acquire(7))

    threads = [threading.Thread(target=request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(set(slots)) == 1 and len(slots) == 8
    assert loader.calls[7] == 1 and len(writer.writes) == 1
    assert pool.snapshot()[0].pins == 8
    for _ in range(8):
        pool.release(7)
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        pool.release(7)


def test_a_slot_reused_by_another_adapter_never_reaches_a_running_request():
    writer = FakeWriter(delay=0.001)
    pool, _loader, _, _ = make_pool(max_loras=3, max_cpu_loras=4, writer=writer)
    errors = []

    def requests(seed):
        rng = random.Random(seed)
        for _ in range(60):
            key = rng.randrange(8)
            try:
                slot = pool.acquire(key, timeout=10)
            except PoolExhausted:
                continue
            with writer.lock:
                writer.held[slot] += 1
            for _ in range(3):  # the request's steps read its slot
                if writer.slots.get(slot) != key:
                    errors.append(f"request for {key} saw {writer.slots.get(slot)}")
                time.sleep(rng.random() * 0.002)
            with writer.lock:
                writer.held[slot] -= 1
            pool.release(key)

    threads = [threading.Thread(target=requests, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not writer.violations
    assert pool.metrics.snapshot()["evictions"]["device"] > 10


def test_a_failed_load_frees_its_slot_and_names_the_cause():
    loader = FakeLoader(broken=frozenset({9}))
    pool, _, _writer, _events = make_pool(max_loras=1, loader=loader)
    with pytest.raises(AdapterCorrupt, match="adapter 9 changed on disk"):
        pool.acquire(9)
    assert use(pool, 1) == 0  # the slot is free again
    assert pool.metrics.snapshot()["failures"] == {"host": 1, "device": 1}

    pool, _, _, _ = make_pool(max_loras=1, writer=FakeWriter(fail=True))
    with pytest.raises(AdapterLoadError, match="into slot 0 failed.*out of memory"):
        pool.acquire(1)
    assert not pool.in_use(1) and pool.snapshot() == []


def test_prefetch_pin_unpin_and_evict():
    pool, loader, writer, events = make_pool(max_loras=2, max_cpu_loras=4)
    assert pool.prefetch(5, to="host").result(5) is not None
    assert loader.calls[5] == 1 and pool.host.keys() == [5] and writer.writes == []
    slot = pool.prefetch(5).result(5)
    assert writer.slots[slot] == 5 and loader.calls[5] == 1
    assert pool.prefetch(5).result(0) == slot  # already there
    assert not pool.in_use(5)  # prefetching pins nothing

    assert pool.pin(1) == pool.pin(1)  # pinning twice keeps one pin
    with pytest.raises(
        PinLimitReached, match="1 adapters are pinned, the most allowed"
    ):
        pool.pin(2)
    assert pool.evict(1) is False  # pinned
    assert pool.unpin(1) and not pool.unpin(1)
    assert pool.evict(1) and pool.evict(5)
    assert pool.snapshot() == [] and pool.host.keys() == []
    assert [k for k, key in events if key == 1] == [
        "loaded",
        "pinned",
        "pinned",
        "unpinned",
        "evicted",
        "evicted",
    ]


def test_metrics_count_bytes_and_latency_per_move():
    pool, _, _, _ = make_pool(max_loras=1)
    use(pool, 1)
    use(pool, 2)
    use(pool, 1)
    m = pool.metrics.snapshot()
    one = pack(weights_for(0), torch.float32, pin=False).num_bytes
    assert m["loads"] == {"disk_to_host": 2, "slot_write": 3}
    assert m["bytes_moved"]["disk_to_host"] == 2 * one
    assert m["hits"] == {"host": 1} and m["misses"] == {"device": 3, "host": 2}
    assert m["latency_seconds"]["slot_write"]["count"] == 3


def test_closing_fails_waiting_and_new_acquires():
    pool, _, _, _ = make_pool(max_loras=1)
    pool.acquire(1)
    failure = []

    def wait():
        try:
            pool.acquire(2, timeout=10)
        except PoolClosed as exc:
            failure.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.1)
    pool.close()
    waiter.join(5)
    assert failure and not waiter.is_alive()
    with pytest.raises(PoolClosed):
        pool.acquire(1)


def test_packing_keeps_every_value_and_converts_dtype():
    """Every value kept, each tensor a contiguous view of the buffer in PEFT's layout (B
    [out, rank]: the slots' rank-major layout is the slot write's business, on the device)."""
    w = LoraWeights(
        {
            (0, "q"): LoraModuleWeights(torch.randn(3, 8), torch.randn(5, 3), 0.25),
            (1, "down"): LoraModuleWeights(torch.randn(2, 7), torch.randn(4, 2), 2.0),
            (2, "o"): LoraModuleWeights(torch.randn(64, 8), torch.randn(96, 64), 0.5),
        }
    )
    packed = pack(w, torch.float32, pin=False)
    for key, module in packed.weights().modules.items():
        assert torch.equal(module.lora_a, w.modules[key].lora_a)
        assert torch.equal(module.lora_b, w.modules[key].lora_b)
        assert module.lora_b.shape == w.modules[key].lora_b.shape
        assert module.lora_a.is_contiguous() and module.lora_b.is_contiguous()
        assert module.scale == w.modules[key].scale
    half = pack(w, torch.bfloat16, pin=False).weights()
    assert half.modules[(0, "q")].lora_a.dtype == torch.bfloat16
    assert torch.equal(
        half.modules[(1, "down")].lora_b, w.modules[(1, "down")].lora_b.bfloat16()
    )
