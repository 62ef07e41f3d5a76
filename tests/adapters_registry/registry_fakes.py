"""Fakes for the pool tests: a loader of tagged adapters and an engine's slots as a dict."""

from __future__ import annotations

import threading
import time
from collections import Counter

import torch

from loraplex.adapters_registry import AdapterCorrupt
from loraplex.platform import LoraModuleWeights, LoraWeights


def weights_for(key: int, rank: int = 4) -> LoraWeights:
    """A one-module adapter whose A is filled with its key, so a slot tells whose it is."""
    return LoraWeights(
        {
            (0, "q"): LoraModuleWeights(
                torch.full((rank, 8), float(key)), torch.ones(8, rank), 0.5
            )
        }
    )


def key_of(weights: LoraWeights) -> int:
    return int(weights.modules[(0, "q")].lora_a[0, 0])


class FakeLoader:
    def __init__(self, delay: float = 0.0, broken: frozenset = frozenset()) -> None:
        self.calls: Counter = Counter()
        self.delay, self.broken = delay, broken
        self.lock = threading.Lock()

    def __call__(self, key):
        with self.lock:
            self.calls[key] += 1
        time.sleep(self.delay)
        if key in self.broken:
            raise AdapterCorrupt(f"adapter {key} changed on disk")
        return weights_for(key)


class FakeWriter:
    """Engine slots as a dict; flags any write into a slot a running request holds."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.slots: dict[int, int] = {}
        self.writes: list[tuple[int, int]] = []
        self.held: Counter = Counter()  # slot → requests running with it (set by tests)
        self.violations: list[str] = []
        self.delay, self.fail = delay, fail
        self.lock = threading.Lock()

    def write_slot(self, slot: int, weights: LoraWeights) -> None:
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("device out of memory")
        with self.lock:
            if self.held[slot]:
                self.violations.append(f"slot {slot} rewritten while in use")
            self.slots[slot] = key_of(weights)
            self.writes.append((slot, key_of(weights)))

    def clear_slot(self, slot: int) -> None:
        with self.lock:
            self.slots.pop(slot, None)
