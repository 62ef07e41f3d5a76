"""LoraSlots.write: replacing the adapter in a slot leaves exactly what writing the new one into
an empty slot leaves (zeros past its ranks and in the slices it does not target), and
`clear` empties a slot; B is held rank-major and holds the logical values, whatever the
layout of the B written."""

from __future__ import annotations

import pytest
import torch

from checkpoints import save_random_adapter
from loraplex.adapters_registry import load_adapter_dir
from loraplex.kernels.sgmv import rank_major
from loraplex.platform import (
    AdapterShapeError,
    LoraModuleWeights,
    LoraWeights,
    ModelSpec,
)
from loraplex.platform.lora_slots import LORA_GROUPS, LoraSlots

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    model_dir = tiny_models["llama2"]
    spec = ModelSpec.from_dir(model_dir)
    root = tmp_path_factory.mktemp("slot-adapters")
    made = {
        "r16_all": save_random_adapter(model_dir, root / "a", 16, ALL, seed=1),
        "r4_qv": save_random_adapter(
            model_dir, root / "b", 4, ["q_proj", "v_proj"], seed=2
        ),
        "r8_mlp": save_random_adapter(
            model_dir, root / "c", 8, ["gate_proj", "down_proj"], seed=3
        ),
    }
    return spec, {k: load_adapter_dir(p, spec, 16) for k, p in made.items()}


def snapshot(slots: LoraSlots, slot: int) -> list[torch.Tensor]:
    return [
        t[slot].clone()
        for groups in slots.layers
        for g in groups.values()
        for t in (g.lora_a, g.lora_b, g.ranks, g.scales)
    ]


@pytest.mark.parametrize(
    "order",
    [
        ("r16_all", "r4_qv"),  # lower ranks, fewer targets
        ("r4_qv", "r16_all"),  # higher
        ("r16_all", "r8_mlp", "r4_qv"),
        ("r8_mlp", "r8_mlp"),  # the same ranks: nothing to zero
    ],
)
def test_a_replaced_adapter_leaves_what_a_fresh_write_leaves(adapters, order):
    spec, weights = adapters
    used = LoraSlots(spec, 3, 16, torch.float32, torch.device("cpu"))
    used.write(1, weights["r16_all"])  # a neighbour that must not change
    neighbour = snapshot(used, 1)
    for name in order:
        used.write(2, weights[name])
    fresh = LoraSlots(spec, 3, 16, torch.float32, torch.device("cpu"))
    fresh.write(2, weights[order[-1]])
    for got, expected in zip(snapshot(used, 2), snapshot(fresh, 2), strict=True):
        assert torch.equal(got, expected)
    assert all(
        torch.equal(a, b) for a, b in zip(snapshot(used, 1), neighbour, strict=True)
    )
    assert any(t.abs().sum() > 0 for t in snapshot(used, 2))


def test_clear_then_write_and_clear_empties(adapters):
    spec, weights = adapters
    slots = LoraSlots(spec, 2, 16, torch.float32, torch.device("cpu"))
    slots.write(0, weights["r16_all"])
    slots.clear(0)
    assert all(t.abs().sum() == 0 for t in snapshot(slots, 0))
    slots.write(0, weights["r4_qv"])
    fresh = LoraSlots(spec, 2, 16, torch.float32, torch.device("cpu"))
    fresh.write(0, weights["r4_qv"])
    for got, expected in zip(snapshot(slots, 0), snapshot(fresh, 0), strict=True):
        assert torch.equal(got, expected)


def test_stage_then_commit_is_a_write_and_the_ranks_wait_for_the_commit(adapters):
    """Between the halves the slot's A and B are the new adapter's, but its ranks and scales
    still the old one's: no kernel applies a half-written adapter's ranks."""
    spec, weights = adapters
    halves = LoraSlots(spec, 2, 16, torch.float32, torch.device("cpu"))
    halves.write(1, weights["r4_qv"])
    before = [
        (g.ranks[1].clone(), g.scales[1].clone())
        for l in halves.layers
        for g in l.values()
    ]
    staged = halves.stage(1, weights["r16_all"])
    between = [
        (g.ranks[1], g.scales[1]) for layer in halves.layers for g in layer.values()
    ]
    for (r0, s0), (r1, s1) in zip(before, between, strict=True):
        assert torch.equal(r0, r1) and torch.equal(s0, s1)
    halves.commit(1, staged)
    whole = LoraSlots(spec, 2, 16, torch.float32, torch.device("cpu"))
    whole.write(1, weights["r16_all"])
    for got, expected in zip(snapshot(halves, 1), snapshot(whole, 1), strict=True):
        assert torch.equal(got, expected)
    with pytest.raises(AdapterShapeError, match="out of range"):
        halves.stage(2, weights["r4_qv"])


def _rank_major_copy(weights: LoraWeights) -> LoraWeights:
    """The same adapter with each B laid out as the host tier packs it: [out, rank] over
    rank-major storage."""
    return LoraWeights(
        {
            key: LoraModuleWeights(m.lora_a, rank_major(m.lora_b), m.scale)
            for key, m in weights.modules.items()
        }
    )


def _expected_slot(slots: LoraSlots, weights: LoraWeights | None, slot: int) -> list:
    """(A, B, ranks, scales) of every group of every layer that holding `weights` in `slot`
    means, built from the definition: each module's A in its slice's first rows, its B in its
    slice's first columns, zeros everywhere else (None: an empty slot)."""
    modules = {} if weights is None else weights.modules
    out = []
    for layer, groups in enumerate(slots.layers):
        for name, group in groups.items():
            a = torch.zeros_like(group.lora_a[slot])
            b = torch.zeros(group.lora_b.shape[1:], dtype=group.lora_b.dtype)
            ranks = torch.zeros_like(group.ranks[slot])
            scales = torch.zeros_like(group.scales[slot])
            for i, target in enumerate(LORA_GROUPS[name]):
                module = modules.get((layer, target))
                if module is None:
                    continue
                r, lo = module.rank, slots.max_rank * i
                a[lo : lo + r] = module.lora_a
                b[group.slice_offsets[i] : group.slice_offsets[i + 1], :r] = (
                    module.lora_b
                )
                ranks[i], scales[i] = r, module.scale
            out += [a, b, ranks, scales]
    return out


def test_the_pool_holds_b_rank_major_with_the_logical_values(adapters):
    """The pool's B is a [slots, out, R] view of rank-major storage (unit stride along out),
    and loading, replacing, clearing and reloading adapters of ranks 16, 8 and 4, from B
    out-major (as read from disk) or rank-major (as the host tier packs it), leaves in every
    slot exactly the logical values the definition gives, zeros past each rank."""
    spec, weights = adapters
    slots = LoraSlots(spec, 3, 16, torch.float32, torch.device("cpu"))
    for groups in slots.layers:
        for group in groups.values():
            b = group.lora_b
            assert b.stride(1) == 1 and b.stride(2) == b.shape[1]
            assert b.stride(0) == b.shape[1] * b.shape[2]
    rank_major_weights = {k: _rank_major_copy(w) for k, w in weights.items()}
    # A single-slice B (o, down) goes where its rank-major source's strides match: the copy
    # from the host tier's packed B is one dense block.
    for (layer, target), module in rank_major_weights["r16_all"].modules.items():
        if target in ("o", "down"):
            written = slots.layers[layer][target].lora_b[0, :, : module.rank]
            assert written.stride() == module.lora_b.stride()
    held: dict[int, LoraWeights | None] = {0: None, 1: None, 2: None}
    steps = [
        (0, weights["r16_all"]),
        (1, rank_major_weights["r4_qv"]),
        (2, weights["r8_mlp"]),
        (1, None),  # cleared
        (0, rank_major_weights["r4_qv"]),  # rank 16 replaced by rank 4
        (1, rank_major_weights["r16_all"]),
        (2, rank_major_weights["r8_mlp"]),  # the same adapter, now rank-major
        (1, weights["r8_mlp"]),  # rank 16 replaced by rank 8, fewer targets
    ]
    for slot, adapter in steps:
        if adapter is None:
            slots.clear(slot)
        else:
            slots.write(slot, adapter)
        held[slot] = adapter
        for s, w in held.items():
            got = snapshot(slots, s)
            for g, e in zip(got, _expected_slot(slots, w, s), strict=True):
                assert torch.equal(g, e), (slot, s)
