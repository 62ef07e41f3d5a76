"""SlotWriter: how the pool puts an adapter into an engine slot, ordered with engine steps.

The pool prepares an adapter off the engine thread (disk → host → device); only the final write
into the engine's slot tensors has to happen between two steps. A SlotWriter hides how: the
EngineThreadSlotWriter hands the write to the engine thread and waits for it; the
DirectSlotWriter writes on the calling thread, for code that owns the engine itself.
"""

from __future__ import annotations

from typing import Protocol

import torch

from loraplex.platform import Engine, EngineThread, LoraWeights


class SlotWriter(Protocol):
    """Writes adapters into engine slots. Both methods may be called from any thread."""

    def write_slot(self, slot: int, weights: LoraWeights) -> None:
        """Put `weights` into `slot`, returning once the write is done (between two steps).

        `weights` may live on the slots' device, in memory allocated on another stream: the
        writer keeps it alive until its copies finish (see record_streams).
        :raises AdapterShapeError: the slot is used by an unfinished request, or does not fit.
        """
        ...

    def clear_slot(self, slot: int) -> None:
        """Empty `slot` (between two steps)."""
        ...


def record_streams(weights: LoraWeights) -> None:
    """Tell the CUDA allocator that the current stream reads `weights`' memory."""
    for module in weights.modules.values():
        for tensor in (module.lora_a, module.lora_b):
            if tensor.is_cuda:
                tensor.record_stream(torch.cuda.current_stream(tensor.device))


def _write(engine: Engine, slot: int, weights: LoraWeights) -> None:
    engine.load_adapter(slot, weights)
    record_streams(weights)


class DirectSlotWriter:
    """Writes on the calling thread: only for a caller that owns the engine (one thread)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def write_slot(self, slot: int, weights: LoraWeights) -> None:
        _write(self.engine, slot, weights)

    def clear_slot(self, slot: int) -> None:
        self.engine.unload_adapter(slot)


class EngineThreadSlotWriter:
    """Writes a slot in two halves: the A and B copies on the calling thread while steps run
    (`Engine.stage_adapter`, into a slot no request uses), then the slot's ranks and scales on
    the engine's thread between two steps, which waits for it. The engine thread so spends
    one small copy per load instead of the whole write (11-36 ms for an 8B adapter, served on
    an H100/H200 on 2026-11-27). A tensor-parallel engine's write, which its workers share,
    runs whole on the engine's thread."""

    def __init__(self, engine_thread: EngineThread, timeout_s: float = 60.0) -> None:
        self.engine_thread = engine_thread
        self.timeout_s = timeout_s

    def write_slot(self, slot: int, weights: LoraWeights) -> None:
        engine = self.engine_thread.engine
        if engine.workers is not None:
            call = self.engine_thread.call(lambda e: _write(e, slot, weights))
            call.result(self.timeout_s)
            return
        # A trivial call first: it runs after every call queued before it, such as the abort of
        # a request whose client left and whose pin was released before the engine saw the
        # abort, so that the slot is free, and no step in flight reads it, when staging starts.
        free = self.engine_thread.call(lambda e: e.check_slot_free(slot))
        free.result(self.timeout_s)
        staged = engine.stage_adapter(slot, weights)
        commit = self.engine_thread.call(lambda e: e.commit_adapter(slot, staged))
        commit.result(self.timeout_s)

    def clear_slot(self, slot: int) -> None:
        future = self.engine_thread.call(lambda engine: engine.unload_adapter(slot))
        future.result(self.timeout_s)
