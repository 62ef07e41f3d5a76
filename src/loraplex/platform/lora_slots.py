"""LoraWeights (one adapter's tensors, on the host) and LoraSlots (the engine's stacked slots).

A slot holds one adapter for every LoRA linear of every layer. Per layer, the slots of a fused
linear are stacked: for q/k/v (3 slices), o (1), gate/up (2) and down (1),
    lora_a  [num_slots, num_slices * max_rank, in_features]
    lora_b  [num_slots, out_features, max_rank]
    ranks   [num_slots, num_slices] int32 (0 = the adapter leaves that slice alone)
    scales  [num_slots, num_slices] float32
An adapter of rank r < max_rank fills the first r rows of its A block and the first r columns of
its B block; the rest of the block is zero, and the kernels read only up to r. Writing a slot
happens between two engine steps, so it is kept to few launches: each A and B block is copied
once, each group's ranks and scales are written as one row each, and only what the slot's last
adapter left past the new ranks is zeroed (nothing, when both have the same ranks).

Under tensor parallelism a rank's slots hold its shard of each adapter (`shard_lora_weights`):
B split by output for the column-parallel targets, A split by input for the row-parallel ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


@dataclass(frozen=True)
class LoraModuleWeights:
    """One adapted linear of one layer."""

    lora_a: torch.Tensor  # [rank, in_features]
    lora_b: torch.Tensor  # [out_features, rank]
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


@dataclass(frozen=True)
class LoraGroupSlots:
    """The stacked slots of one fused LoRA linear of one layer."""

    lora_a: torch.Tensor  # [num_slots, num_slices * max_rank, in_features]
    lora_b: torch.Tensor  # [num_slots, out_features, max_rank]
    ranks: torch.Tensor  # [num_slots, num_slices] int32
    scales: torch.Tensor  # [num_slots, num_slices] float32
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
        self.layers: list[dict[str, LoraGroupSlots]] = []
        for _ in range(spec.num_layers):
            groups = {}
            for group, targets in LORA_GROUPS.items():
                in_features = self.local_spec.lora_shape(targets[0])[0]
                outs = [self.local_spec.lora_shape(t)[1] for t in targets]
                offsets = tuple(sum(outs[:i]) for i in range(len(outs) + 1))
                n = len(targets)
                groups[group] = LoraGroupSlots(
                    lora_a=torch.zeros(
                        num_slots, n * max_rank, in_features, dtype=dtype, device=device
                    ),
                    lora_b=torch.zeros(
                        num_slots, offsets[-1], max_rank, dtype=dtype, device=device
                    ),
                    ranks=torch.zeros(num_slots, n, dtype=torch.int32, device=device),
                    scales=torch.zeros(
                        num_slots, n, dtype=torch.float32, device=device
                    ),
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
        self._check_slot(slot)
        weights.check_fits(self.spec, self.max_rank)
        self._write(slot, shard_lora_weights(weights, self.spec, self.tp))

    def write_shard(self, slot: int, shard: LoraWeights) -> None:
        """Put an adapter's shard for this rank (`shard_lora_weights`) into `slot`.

        :raises AdapterShapeError: the shard does not fit this rank's slots.
        """
        self._check_slot(slot)
        shard.check_fits(self.local_spec, self.max_rank)
        self._write(slot, shard)

    def _write(self, slot: int, weights: LoraWeights) -> None:
        ranks: dict[tuple[int, str], list[int]] = {}
        scales: dict[tuple[int, str], list[float]] = {}
        for (layer, target), module in weights.modules.items():
            group_name, i = _GROUP_OF[target]
            group = self.layers[layer][group_name]
            rank = module.rank
            rows = slice(i * self.max_rank, i * self.max_rank + rank)
            outs = slice(group.slice_offsets[i], group.slice_offsets[i + 1])
            group.lora_a[slot, rows].copy_(module.lora_a, non_blocking=True)
            group.lora_b[slot, outs, :rank].copy_(module.lora_b, non_blocking=True)
            n = len(LORA_GROUPS[group_name])
            ranks.setdefault((layer, group_name), [0] * n)[i] = rank
            scales.setdefault((layer, group_name), [0.0] * n)[i] = module.scale
        for layer, groups in enumerate(self.layers):
            for name, group in groups.items():
                n = len(LORA_GROUPS[name])
                new = ranks.get((layer, name), [0] * n)
                self._zero_past(group, slot, self._held[layer][name][slot], new)
                group.ranks[slot].copy_(torch.tensor(new, dtype=torch.int32))
                group.scales[slot].copy_(
                    torch.tensor(scales.get((layer, name), [0.0] * n))
                )
                self._held[layer][name][slot] = new

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
                group.ranks[slot].zero_()
                group.scales[slot].zero_()
                self._held[layer][name][slot] = [0] * len(LORA_GROUPS[name])

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
            lora_a=take_shard(module.lora_a, None, columns).contiguous(),
            lora_b=take_shard(module.lora_b, rows, None).contiguous(),
            scale=module.scale,
        )
    return LoraWeights(modules)
