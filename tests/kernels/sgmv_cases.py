"""Random SGMV problems and their float64 definition, shared by the Triton CPU and GPU tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.kernels.sgmv import rank_major

POPULARITY = ("distinct", "uniform", "zipf", "identical", "skewed")
# B's memory layouts (kernels/sgmv/layout.py): unit stride along the rank, or along the output
# (rank-major storage seen through a transpose, the slot pool's).
B_LAYOUTS = ("out_major", "rank_major")


def token_slots_for(
    pattern: str, num_tokens: int, num_slots: int, gen, base_only: float = 0.2
) -> list[int]:
    """Punica's adapter-popularity patterns, plus a share of base-only (-1) tokens."""
    if pattern == "distinct":
        slots = [t % num_slots for t in range(num_tokens)]
    elif pattern == "uniform":
        slots = torch.randint(0, num_slots, (num_tokens,), generator=gen).tolist()
    elif pattern == "zipf":
        weights = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64)
        slots = torch.multinomial(weights, num_tokens, True, generator=gen).tolist()
    elif pattern == "identical":
        slots = [num_slots - 1] * num_tokens
    elif pattern == "skewed":  # one slot takes almost everything
        slots = [0 if t % 8 else 1 + t % (num_slots - 1) for t in range(num_tokens)]
    else:
        raise ValueError(pattern)
    drop = torch.rand(num_tokens, generator=gen) < base_only
    return [-1 if d else s for s, d in zip(slots, drop.tolist(), strict=True)]


@dataclass
class Problem:
    """One fused LoRA linear with S slices: x, y (in/out), stacked A/B, ranks, scales."""

    x: torch.Tensor  # [T, in]
    y: torch.Tensor  # [T, out]
    lora_a: torch.Tensor  # [slots, S * R, in]
    lora_b: torch.Tensor  # [slots, out, R], out-major or rank-major (B_LAYOUTS)
    ranks: torch.Tensor  # [slots, S] int32
    scales: torch.Tensor  # [slots, S] float32
    slice_offsets: tuple[int, ...]
    token_slots: list[int]

    @property
    def max_rank(self) -> int:
        return self.lora_b.shape[2]


def make_problem(
    seed: int,
    *,
    num_tokens: int,
    in_features: int,
    widths: tuple[int, ...],
    max_rank: int,
    num_slots: int,
    pattern: str,
    dtype: torch.dtype,
    rank_choices: tuple[int, ...] | None = None,
    device: str | torch.device = "cpu",
    b_layout: str = "out_major",
) -> Problem:
    """Fresh random inputs (never zeros), drawn on `device`; A and B scaled so that the delta
    is O(1) like y, B laid out as `b_layout` says (one of B_LAYOUTS).

    Ranks are drawn from `rank_choices` (default 0..max_rank, so some slices are untargeted)
    per slot and slice; every value past a slot's rank is NaN, which a kernel must never read.
    """
    host_gen = torch.Generator().manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    num_slices = len(widths)
    out = sum(widths)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=device) * scale

    x = randn(num_tokens, in_features)
    y = randn(num_tokens, out)
    lora_a = randn(
        num_slots, num_slices * max_rank, in_features, scale=in_features**-0.5
    )
    lora_b = randn(num_slots, out, max_rank, scale=max_rank**-0.5)
    choices = torch.tensor(rank_choices or range(max_rank + 1), dtype=torch.int32)
    picks = torch.randint(0, len(choices), (num_slots, num_slices), generator=host_gen)
    ranks = choices[picks]
    scales = torch.rand(num_slots, num_slices, generator=host_gen) + 0.5
    offsets = tuple(sum(widths[:i]) for i in range(num_slices + 1))
    for s in range(num_slots):
        for i in range(num_slices):
            r = int(ranks[s, i])
            lora_a[s, i * max_rank + r : (i + 1) * max_rank] = float("nan")
            lora_b[s, offsets[i] : offsets[i + 1], r:] = float("nan")
    slots = token_slots_for(pattern, num_tokens, num_slots, host_gen)
    lora_b = lora_b.to(dtype)
    if b_layout == "rank_major":
        lora_b = rank_major(lora_b)
    elif b_layout != "out_major":
        raise ValueError(b_layout)
    return Problem(
        x=x.to(dtype),
        y=y.to(dtype),
        lora_a=lora_a.to(dtype),
        lora_b=lora_b,
        ranks=ranks.to(device),
        scales=scales.to(device),
        slice_offsets=offsets,
        token_slots=slots,
    )


def _rows_by_slot(p: Problem) -> dict[int, torch.Tensor]:
    slots = torch.tensor(p.token_slots, device=p.x.device)
    return {
        s: torch.nonzero(slots == s).flatten()
        for s in sorted({s for s in p.token_slots if s >= 0})
    }


def expected_shrink(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """(v in float64, mask of the entries the definition owns: token has a slot, column < rank),
    computed on the problem's device."""
    num_slices = p.ranks.shape[1]
    v = torch.zeros(p.x.shape[0], num_slices * p.max_rank, dtype=torch.float64)
    v = v.to(p.x.device)
    owned = torch.zeros_like(v, dtype=torch.bool)
    ranks = p.ranks.tolist()
    for slot, rows in _rows_by_slot(p).items():
        x = p.x[rows].double()
        for i in range(num_slices):
            cols = torch.arange(i * p.max_rank, i * p.max_rank + ranks[slot][i])
            cols = cols.to(p.x.device)
            v[rows[:, None], cols] = x @ p.lora_a[slot, cols].double().T
            owned[rows[:, None], cols] = True
    return v, owned


def poisoned_v(p: Problem) -> torch.Tensor:
    """The shrink's v from the float64 definition, rounded to float32, in rows 8 columns wider
    than S·R; NaN in every entry no (token, column within rank) pair owns, and in the padding."""
    v_exact, owned = expected_shrink(p)
    rows = torch.full(
        (v_exact.shape[0], v_exact.shape[1] + 8), float("nan"), device=p.x.device
    )
    v = rows[:, : v_exact.shape[1]]
    v[owned] = v_exact[owned].float()
    return v


def expected_y(p: Problem, y_before: torch.Tensor) -> torch.Tensor:
    """y + the LoRA delta of every slice, in float64 (the definition, slot by slot)."""
    y = y_before.double().clone()
    ranks, scales = p.ranks.tolist(), p.scales.tolist()
    for slot, rows in _rows_by_slot(p).items():
        x = p.x[rows].double()
        for i, r in enumerate(ranks[slot]):
            if r == 0:
                continue
            lo, hi = p.slice_offsets[i], p.slice_offsets[i + 1]
            a_i = p.lora_a[slot, i * p.max_rank : i * p.max_rank + r].double()
            delta = (x @ a_i.T) @ p.lora_b[slot, lo:hi, :r].double().T
            y[rows, lo:hi] += scales[slot][i] * delta
    return y


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64; NaN anywhere makes it NaN (never passes)."""
    actual = actual.double().to(expected.device)
    return float((actual - expected).norm() / expected.norm())
