"""LoraWeights (one adapter's tensors, on the host) and LoraSlots (the engine's stacked slots).

A slot holds one adapter for every LoRA linear of every layer. Per layer, the slots of a fused
linear are stacked: for q/k/v (3 slices), o (1), gate/up (2) and down (1),
    lora_a  [num_slots, num_slices * max_rank, in_features]
    lora_b  [num_slots, out_features, max_rank], a view of rank-major [num_slots, max_rank, out]
    ranks   [num_slots, num_slices] int32 (0 = the adapter leaves that slice alone)
    scales  [num_slots, num_slices] float32
An adapter of rank r < max_rank fills the first r rows of its A block and the first r columns of
its B block; the rest of the block is zero, and the kernels read only up to r. B is stored
rank-major (`sgmv.new_lora_b`) so that those r columns are r contiguous rows of out_features:
a rank-8 adapter in a rank-64 pool reads 8 dense rows instead of 16 bytes of every 128-byte
row. Sources come in PEFT's [out, rank] (the host tier's, copied to the device first), so the
write transposes on the device; a rank-major source into a single-slice B is one dense copy. Writing a slot
happens between two engine steps, so it is kept short: the A and B blocks go in one foreach copy,
the ranks and scales of all layers in one copy each from pinned memory (never a pageable copy,
which would wait for the steps in flight), and only what the slot's last adapter left past the
new ranks is zeroed (nothing, when both have the same ranks).

Under tensor parallelism a rank's slots hold its shard of each adapter (`shard_lora_weights`):
B split by output for the column-parallel targets, A split by input for the row-parallel ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from loraplex.kernels.sgmv import new_lora_b

from .config import ModelSpec
from .errors import AdapterShapeError
from .parallel import SINGLE, TensorParallel, shard_spec, take_shard

LORA_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q", "k", "v"),
    "o": ("o",),
    "gate_up": ("gate", "up"),
    "down": ("down",),
}
# target → (its group, its slice in the group)
_GROUP_OF = {t: (g, i) for g, ts in LORA_GROUPS.items() for i, t in enumerate(ts)}
# target → its column in a layer's row of ranks and scales (q k v o gate up down)
_SLICE_OF = {t: i for i, t in enumerate(t for ts in LORA_GROUPS.values() for t in ts)}
_SLICES_PER_LAYER = len(_SLICE_OF)


def _slice_starts() -> list[int]:
    """Each group's first column in a layer's row of ranks and scales."""
    return [_SLICE_OF[targets[0]] for targets in LORA_GROUPS.values()]


@dataclass(frozen=True)
class LoraModuleWeights:
    """One adapted linear of one layer."""

    lora_a: torch.Tensor  # [rank, in_features]
    # [out_features, rank], any strides: out-major as PEFT (and the host tier) store it, or a
    # transposed view of rank-major [rank, out] storage (the slots' own layout).
    lora_b: torch.Tensor
    scale: float  # alpha / rank, or alpha / sqrt(rank) for rsLoRA

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's tensors on the host, keyed by (layer, target) with target in q,k,v,o,gate,up,down."""

    modules: dict[tuple[int, str], LoraModuleWeights]

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def num_bytes(self) -> int:
        return sum(
            m.lora_a.numel() * m.lora_a.element_size()
            + m.lora_b.numel() * m.lora_b.element_size()
            for m in self.modules.values()
        )

    def check_fits(self, spec: ModelSpec, max_lora_rank: int) -> None:
        """Raise AdapterShapeError naming the first tensor that does not fit this model."""
        for (layer, target), module in sorted(self.modules.items()):
            where = f"layer {layer} {target}_proj"
            if not 0 <= layer < spec.num_layers:
                raise AdapterShapeError(
                    f"{where}: the base model has {spec.num_layers} layers"
                )
            in_features, out_features = spec.lora_shape(target)
            rank = module.rank
            if not 1 <= rank <= max_lora_rank:
                raise AdapterShapeError(
                    f"{where}: rank {rank} exceeds max_lora_rank {max_lora_rank}"
                )
            if tuple(module.lora_a.shape) != (rank, in_features):
                raise AdapterShapeError(
                    f"{where}: lora_A has shape {tuple(module.lora_a.shape)}, "
                    f"expected ({rank}, {in_features})"
                )
            if tuple(module.lora_b.shape) != (out_features, rank):
                raise AdapterShapeError(
                    f"{where}: lora_B has shape {tuple(module.lora_b.shape)}, "
                    f"expected ({out_features}, {rank})"
                )


class StagedRanks(NamedTuple):
    """What `LoraSlots.commit` writes for one staged adapter: per layer, the rank and the
    scale of each of its seven targets (q k v o gate up down; 0 where it has none)."""

    ranks: list[list[int]]
    scales: list[list[float]]


@dataclass(frozen=True)
class LoraGroupSlots:
    """The stacked slots of one fused LoRA linear of one layer."""

    lora_a: torch.Tensor  # [num_slots, num_slices * max_rank, in_features]
    lora_b: torch.Tensor  # [num_slots, out_features, max_rank], rank-major (new_lora_b)
    ranks: torch.Tensor  # [num_slots, num_slices] int32, a view (row stride 7)
    scales: torch.Tensor  # [num_slots, num_slices] float32, a view (row stride 7)
    slice_offsets: tuple[int, ...]  # num_slices + 1 output offsets


class LoraSlots:
    """`num_slots` adapter slots for every LoRA linear of every layer of one model (of this
    rank's shard of it: `spec` is the whole model's, `tp` says which shard)."""

    def __init__(
        self,
        spec: ModelSpec,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        tp: TensorParallel = SINGLE,
    ) -> None:
        self.spec = spec
        self.tp = tp
        self.local_spec = shard_spec(spec, tp)
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.device = torch.device(device)
        # Every group's ranks and scales are views of one tensor each, [layer, slot, slice of
        # the layer's 7], so a write sends them in one copy from pinned memory (a copy from
        # pageable memory waits for the GPU's queue) instead of one per group and layer.
        offsets_of = dict(zip(LORA_GROUPS, _slice_starts(), strict=True))
        shape = (spec.num_layers, num_slots, _SLICES_PER_LAYER)
        self._ranks = torch.zeros(shape, dtype=torch.int32, device=device)
        self._scales = torch.zeros(shape, dtype=torch.float32, device=device)
        self.layers: list[dict[str, LoraGroupSlots]] = []
        for layer in range(spec.num_layers):
            groups = {}
            for group, targets in LORA_GROUPS.items():
                in_features = self.local_spec.lora_shape(targets[0])[0]
                outs = [self.local_spec.lora_shape(t)[1] for t in targets]
                offsets = tuple(sum(outs[:i]) for i in range(len(outs) + 1))
                n = len(targets)
                first = offsets_of[group]
                groups[group] = LoraGroupSlots(
                    lora_a=torch.zeros(
                        num_slots, n * max_rank, in_features, dtype=dtype, device=device
                    ),
                    lora_b=new_lora_b(
                        num_slots, offsets[-1], max_rank, dtype=dtype, device=device
                    ),
                    ranks=self._ranks[layer, :, first : first + n],
                    scales=self._scales[layer, :, first : first + n],
                    slice_offsets=offsets,
                )
            self.layers.append(groups)
        # Host copy of each slot's ranks, per layer and group: what a write must zero past.
        self._held: list[dict[str, list[list[int]]]] = [
            {
                name: [[0] * len(ts) for _ in range(num_slots)]
                for name, ts in LORA_GROUPS.items()
            }
            for _ in range(spec.num_layers)
        ]

    @property
    def num_bytes(self) -> int:
        return sum(
            g.lora_a.numel() * g.lora_a.element_size()
            + g.lora_b.numel() * g.lora_b.element_size()
            for groups in self.layers
            for g in groups.values()
        )

    def write(self, slot: int, weights: LoraWeights) -> None:
        """Put an adapter into `slot`, replacing whatever was there.

        :raises AdapterShapeError: the adapter does not fit this model or the slot's max rank.
        """
        self.commit(slot, self.stage(slot, weights))

    def write_shard(self, slot: int, shard: LoraWeights) -> None:
        """Put an adapter's shard for this rank (`shard_lora_weights`) into `slot`.

        :raises AdapterShapeError: the shard does not fit this rank's slots.
        """
        self._check_slot(slot)
        shard.check_fits(self.local_spec, self.max_rank)
        self.commit(slot, self._stage(slot, shard))

    def stage(self, slot: int, weights: LoraWeights) -> StagedRanks:
        """The first half of a write: the A and B blocks copied and stale rows zeroed, on the
        current stream. Until `commit`, the slot's ranks and scales still describe what it
        held before, so this may run off the engine's thread, while steps run, for a slot that
        no request uses. Returns what `commit` writes.

        :raises AdapterShapeError: the adapter does not fit this model or the slot's max rank.
        """
        self._check_slot(slot)
        weights.check_fits(self.spec, self.max_rank)
        return self._stage(slot, shard_lora_weights(weights, self.spec, self.tp))

    def commit(self, slot: int, staged: StagedRanks) -> None:
        """The second half, between two steps: the slot's ranks and scales of every layer, in
        one copy each (from pinned memory on a GPU, so the host does not wait for the steps
        in flight)."""
        self._check_slot(slot)
        ranks, scales = staged
        self._ranks[:, slot].copy_(self._staged(ranks, torch.int32), non_blocking=True)
        self._scales[:, slot].copy_(
            self._staged(scales, torch.float32), non_blocking=True
        )

    def _stage(self, slot: int, weights: LoraWeights) -> StagedRanks:
        num_layers = self.spec.num_layers
        ranks = [[0] * _SLICES_PER_LAYER for _ in range(num_layers)]
        scales = [[0.0] * _SLICES_PER_LAYER for _ in range(num_layers)]
        targets, sources = [], []
        for (layer, target), module in weights.modules.items():
            group_name, i = _GROUP_OF[target]
            group = self.layers[layer][group_name]
            rank = module.rank
            rows = slice(i * self.max_rank, i * self.max_rank + rank)
            outs = slice(group.slice_offsets[i], group.slice_offsets[i + 1])
            targets += [group.lora_a[slot, rows], group.lora_b[slot, outs, :rank]]
            sources += [module.lora_a, module.lora_b]
            ranks[layer][_SLICE_OF[target]] = rank
            scales[layer][_SLICE_OF[target]] = module.scale
        torch._foreach_copy_(targets, sources, non_blocking=True)
        for layer, groups in enumerate(self.layers):
            for name, group in groups.items():
                first = _SLICE_OF[LORA_GROUPS[name][0]]
                new = ranks[layer][first : first + len(LORA_GROUPS[name])]
                self._zero_past(group, slot, self._held[layer][name][slot], new)
                self._held[layer][name][slot] = new
        return StagedRanks(ranks, scales)

    def _staged(self, rows: list[list], dtype: torch.dtype) -> torch.Tensor:
        """`rows` as a host tensor, pinned when the slots are on a GPU so that the copy does
        not wait for the steps in flight (the caching host allocator keeps it alive until the
        copy is done)."""
        host = torch.tensor(rows, dtype=dtype)
        return host.pin_memory() if self.device.type == "cuda" else host

    def _zero_past(
        self, group: LoraGroupSlots, slot: int, held: list[int], new: list[int]
    ) -> None:
        """Zero the rows of A and columns of B that ranks `held` filled and `new` do not."""
        for i, (old, rank) in enumerate(zip(held, new, strict=True)):
            if old > rank:
                base = i * self.max_rank
                group.lora_a[slot, base + rank : base + old].zero_()
                outs = slice(group.slice_offsets[i], group.slice_offsets[i + 1])
                group.lora_b[slot, outs, rank:old].zero_()

    def clear(self, slot: int) -> None:
        """Empty a slot: rank 0 everywhere, so the kernels add nothing for it."""
        self._check_slot(slot)
        for layer, groups in enumerate(self.layers):
            for name, group in groups.items():
                group.lora_a[slot].zero_()
                group.lora_b[slot].zero_()
                self._held[layer][name][slot] = [0] * len(LORA_GROUPS[name])
        self._ranks[:, slot].zero_()
        self._scales[:, slot].zero_()

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise AdapterShapeError(
                f"slot {slot} out of range: the engine has {self.num_slots} slots"
            )


def shard_lora_weights(
    weights: LoraWeights, spec: ModelSpec, tp: TensorParallel
) -> LoraWeights:
    """The part of an adapter that rank `tp.rank` holds: A [r, in] keeps the input columns of a
    row-parallel target, B [out, r] the output rows of a column-parallel one."""
    if not tp.enabled:
        return weights
    modules = {}
    for (layer, target), module in weights.modules.items():
        rows, columns = tp.weight_shard(spec, target)
        modules[(layer, target)] = LoraModuleWeights(
            lora_a=_dense(take_shard(module.lora_a, None, columns)),
            lora_b=_dense(take_shard(module.lora_b, rows, None)),
            scale=module.scale,
        )
    return LoraWeights(modules)


def _dense(shard: torch.Tensor) -> torch.Tensor:
    """A 2-D shard as a dense tensor in its source's stride order (`clone` keeps it, where
    `contiguous` would not): a rank-major B stays rank-major, so that its copy into a slot of
    a single-slice group stays one dense copy. No copy when it already is dense."""
    if shard.is_contiguous() or shard.T.is_contiguous():
        return shard
    return shard.clone()
