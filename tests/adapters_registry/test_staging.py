"""PinnedStaging lends a bounded set of reusable buffers (pinned on a GPU machine; plain here)
that host → device copies pass through, so the host tier never pins an adapter itself."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from loraplex.adapters_registry.packed import pack
from loraplex.adapters_registry.staging import PinnedStaging
from loraplex.platform import LoraModuleWeights, LoraWeights


def test_buffers_grow_to_the_largest_request_then_are_reused():
    staging = PinnedStaging(1, pin=False)
    with staging.borrow(100) as first:
        assert first.shape == (100,) and first.dtype == torch.uint8
        pointer = first.data_ptr()
    with staging.borrow(60) as smaller:  # the same storage, a shorter view
        assert smaller.shape == (60,) and smaller.data_ptr() == pointer
    with staging.borrow(300) as larger:
        assert larger.shape == (300,)
    with staging.borrow(300) as again:
        assert again.data_ptr() == larger.data_ptr()
    assert staging.allocations == 2  # 100 bytes, then 300: never once per borrow


def test_borrowers_past_the_count_wait_for_a_return():
    staging = PinnedStaging(2, pin=False)
    held, events = [], []
    release = threading.Event()

    def borrower(name: str) -> None:
        with staging.borrow(16) as buffer:
            held.append((name, buffer.data_ptr()))
            events.append(f"{name} in")
            release.wait(10)
        events.append(f"{name} out")

    threads = [threading.Thread(target=borrower, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    while len(held) < 2:
        time.sleep(0.01)
    assert held[0][1] != held[1][1]  # two borrowers, two buffers
    late = threading.Thread(target=borrower, args=("c",))
    late.start()
    time.sleep(0.2)
    assert "c in" not in events  # both buffers are lent: the third waits
    release.set()
    for t in [*threads, late]:
        t.join(10)
    assert events.count("c in") == 1 and events.index("c in") > events.index("a in")


def test_a_buffer_comes_back_when_the_borrower_fails():
    staging = PinnedStaging(1, pin=False)
    with pytest.raises(RuntimeError, match="copy failed"), staging.borrow(8):
        raise RuntimeError("copy failed")
    with staging.borrow(8) as buffer:  # not lost: this would wait forever otherwise
        assert buffer.numel() == 8


def test_a_staged_copy_carries_the_adapter_bytes_exactly():
    """What to_device does on a GPU, on the host: pack, copy into the staging buffer, and the
    views read from there are the adapter's tensors."""
    gen = torch.Generator().manual_seed(0)
    weights = LoraWeights(
        {
            (layer, target): LoraModuleWeights(
                torch.randn(4, 32, generator=gen),
                torch.randn(48, 4, generator=gen),
                2.0,
            )
            for layer in range(2)
            for target in ("q", "down")
        }
    )
    packed = pack(weights, torch.float16, pin=False)
    staging = PinnedStaging(1, pin=False)
    with staging.borrow(packed.num_bytes) as buffer:
        buffer.copy_(packed.buffer)
        staged = type(packed)(buffer.clone(), packed.layout, packed.dtype).weights()
    for key, module in weights.modules.items():
        assert torch.equal(staged.modules[key].lora_a, module.lora_a.half())
        assert torch.equal(staged.modules[key].lora_b, module.lora_b.half())


def test_a_count_below_one_is_refused():
    with pytest.raises(ValueError, match="at least one buffer"):
        PinnedStaging(0, pin=False)
