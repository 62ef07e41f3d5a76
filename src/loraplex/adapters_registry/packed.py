"""PackedAdapter: one adapter's tensors in one flat buffer, so a tier move is one copy.

An 8B-shaped rank-16 adapter is 448 tensors; copying them one by one to the GPU pays a launch
per tensor, copying one flat buffer runs at the link's bandwidth. On the host tier the buffer is
ordinary memory; the copy to the device goes through a reusable pinned buffer (staging.py), so
it is asynchronous on a side stream without pinning every adapter. Every tensor of the adapter
is a view into the buffer, already in the slots' dtype.

B stays as PEFT stores it, [out, rank], although the engine's slots hold B rank-major
(`sgmv.new_lora_b`): the buffer goes to the GPU in one flat copy and the slot write transposes
there, where it costs microseconds. Packing B rank-major on the host was tried (472aed8): it
doubled `pack` on the loader thread (45 → 85 ms for an 8B adapter, 2-core CPU, 2026-11-28) to
save nothing on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loraplex.platform import LoraModuleWeights, LoraWeights

from .staging import PinnedStaging

_ALIGN = 256  # bytes; every view starts on this boundary


@dataclass(frozen=True)
class ModuleLayout:
    """Where one module's A and B live in the flat buffer."""

    layer: int
    target: str  # q, k, v, o, gate, up, down
    scale: float
    a_offset: int  # bytes
    a_shape: tuple[int, int]  # [rank, in_features]
    b_offset: int  # bytes
    b_shape: tuple[int, int]  # [out_features, rank]


@dataclass(frozen=True)
class PackedAdapter:
    """An adapter as one buffer plus the layout of its tensors in it."""

    buffer: torch.Tensor  # [num_bytes] uint8, host or device
    layout: tuple[ModuleLayout, ...]
    dtype: torch.dtype  # of every A and B

    @property
    def num_bytes(self) -> int:
        return self.buffer.numel()

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def weights(self) -> LoraWeights:
        """LoraWeights whose tensors are views into the buffer (no copy)."""
        return LoraWeights(
            {
                (m.layer, m.target): LoraModuleWeights(
                    self._view(m.a_offset, m.a_shape),
                    self._view(m.b_offset, m.b_shape),
                    m.scale,
                )
                for m in self.layout
            }
        )

    def _view(self, offset: int, shape: tuple[int, int]) -> torch.Tensor:
        size = math.prod(shape) * _itemsize(self.dtype)
        return self.buffer[offset : offset + size].view(self.dtype).view(shape)

    def to_device(
        self,
        device: torch.device,
        stream: torch.cuda.Stream | None = None,
        staging: PinnedStaging | None = None,
    ) -> PackedAdapter:
        """One copy of the whole buffer to `device`, finished when this returns.

        On CUDA the copy runs on `stream` (a side stream, so engine steps keep running) and
        only this thread waits for it; a pageable buffer first goes into a pinned buffer
        borrowed from `staging` (without one, the copy is a synchronous pageable one). The new
        buffer belongs to `stream`: whoever copies from it on another stream must call
        record_stream for that stream before dropping it.
        """
        if device.type != "cuda":
            return PackedAdapter(self.buffer.to(device), self.layout, self.dtype)
        if self.buffer.is_pinned() or staging is None:
            return self._copy_to(device, stream, self.buffer)
        with staging.borrow(self.num_bytes) as pinned:
            pinned.copy_(self.buffer)
            return self._copy_to(device, stream, pinned)

    def _copy_to(
        self,
        device: torch.device,
        stream: torch.cuda.Stream | None,
        source: torch.Tensor,
    ) -> PackedAdapter:
        with torch.cuda.stream(stream):  # None: the current stream
            target = torch.empty(self.num_bytes, dtype=torch.uint8, device=device)
            target.copy_(source, non_blocking=source.is_pinned())
            done = torch.cuda.Event()
            done.record()
        done.synchronize()  # `source` (a staging buffer) is free again after this
        return PackedAdapter(target, self.layout, self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def pack(weights: LoraWeights, dtype: torch.dtype, pin: bool) -> PackedAdapter:
    """Copy an adapter into one new buffer in `dtype` (pinned if `pin`)."""
    itemsize = _itemsize(dtype)
    layout, offset = [], 0
    for (layer, target), module in sorted(weights.modules.items()):
        a_shape = tuple(module.lora_a.shape)
        b_shape = tuple(module.lora_b.shape)
        a_offset = offset
        offset = _aligned(a_offset + math.prod(a_shape) * itemsize)
        b_offset = offset
        offset = _aligned(b_offset + math.prod(b_shape) * itemsize)
        layout.append(
            ModuleLayout(
                layer, target, module.scale, a_offset, a_shape, b_offset, b_shape
            )
        )
    buffer = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
    packed = PackedAdapter(buffer, tuple(layout), dtype)
    targets, sources = [], []
    for key, module in packed.weights().modules.items():
        source = weights.modules[key]
        targets += [module.lora_a, module.lora_b]
        sources += [source.lora_a, source.lora_b]
    # One call for the 896 copies of an 8B adapter: each torch call lets go of the GIL, and a
    # loader thread taking it back behind a busy engine thread waits each time.
    torch._foreach_copy_(targets, sources)
    return packed
