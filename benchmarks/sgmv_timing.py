"""Inputs, timers, byte floors and torch baselines for bench_sgmv.py.

Timers: eager = the median of `triton.testing.do_bench` (L2 flushed before each call); graph =
the median replay of a CUDA graph holding `reps` calls, minus the replay of a graph holding one
trivial kernel (the fixed cost of a replay), divided by `reps`. On CPU tensors (the --smoke run
in Triton's interpreter) both fall back to a wall clock and no graph, to check the plumbing only.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loraplex.kernels import sgmv
from loraplex.kernels.sgmv import LoraSegments, build_segments, rank_major

# B's memory layouts (kernels/sgmv/layout.py); the engine's slot pool holds B rank-major.
B_LAYOUTS = ("rank_major", "out_major")


@dataclass(frozen=True)
class Linear:
    """One fused LoRA linear: input features and the widths of its output slices."""

    name: str
    in_features: int
    widths: tuple[int, ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(sum(self.widths[:i]) for i in range(len(self.widths) + 1))


LLAMA_8B = (
    Linear("o", 4096, (4096,)),
    Linear("qkv", 4096, (4096, 1024, 1024)),
    Linear("gate_up", 4096, (14336, 14336)),
    Linear("down", 14336, (4096,)),
)
TINY = (
    Linear("o", 64, (64,)),
    Linear("qkv", 64, (64, 16, 16)),
    Linear("gate_up", 64, (96, 96)),
    Linear("down", 96, (64,)),
)


@dataclass
class LoraInputs:
    """One set of inputs of a case; tokens are laid out grouped by slot, as prefill chunks are."""

    linear: Linear
    x: torch.Tensor  # [T, in]
    y: torch.Tensor  # [T, out]
    lora_a: torch.Tensor  # [num_slots, S * R, in], zero past each slot's rank
    lora_b: torch.Tensor  # [num_slots, out, R], zero past each slot's rank; b_layout
    ranks: torch.Tensor  # [num_slots, S] int32
    scales: torch.Tensor  # [num_slots, S] float32
    segments: LoraSegments
    runs: list[tuple[int, int, int]]  # (first token, end, slot) of each run of one slot
    token_slots: torch.Tensor  # [T] int64, for the gather baseline
    b_layout: str = "rank_major"  # one of B_LAYOUTS

    @property
    def max_rank(self) -> int:
        return self.lora_b.shape[2]


def make_inputs(
    linear: Linear,
    run_lengths: Sequence[int],
    slot_ranks: Sequence[int],
    max_rank: int,
    dtype: torch.dtype,
    device: torch.device,
    tile_tokens: int = 64,
    b_layout: str = "rank_major",
) -> LoraInputs:
    """Run j holds run_lengths[j] tokens of slot j, whose rank is slot_ranks[j] on every slice;
    B in `b_layout` (rank-major, as the engine's pool holds it, or out-major)."""
    if b_layout not in B_LAYOUTS:
        raise ValueError(f"b_layout {b_layout!r}: one of {B_LAYOUTS}")
    num_slots, num_slices = len(run_lengths), len(linear.widths)
    num_tokens, out = sum(run_lengths), sum(linear.widths)
    x = torch.randn(num_tokens, linear.in_features, device=device, dtype=dtype)
    y = torch.randn(num_tokens, out, device=device, dtype=dtype)
    lora_a = torch.randn(
        num_slots, num_slices * max_rank, linear.in_features, device=device
    )
    lora_a = (lora_a * linear.in_features**-0.5).to(dtype)
    lora_b = (torch.randn(num_slots, out, max_rank, device=device) * 0.1).to(dtype)
    rank_of = torch.tensor(slot_ranks, dtype=torch.int32, device=device)
    ranks = rank_of[:, None].repeat(1, num_slices).contiguous()
    rows = torch.arange(max_rank, device=device)
    past_rank = rows[None, :] >= rank_of[:, None]  # [slots, R]
    lora_a.view(num_slots, num_slices, max_rank, -1).masked_fill_(
        past_rank[:, None, :, None], 0.0
    )
    lora_b.masked_fill_(past_rank[:, None, :], 0.0)
    if b_layout == "rank_major":
        lora_b = rank_major(lora_b)
    scales = torch.full((num_slots, num_slices), 2.0, device=device)
    token_slots, runs, start = [], [], 0
    for slot, length in enumerate(run_lengths):
        token_slots += [slot] * length
        runs.append((start, start + length, slot))
        start += length
    return LoraInputs(
        linear,
        x,
        y,
        lora_a,
        lora_b,
        ranks,
        scales,
        build_segments(token_slots, device, tile_tokens=tile_tokens),
        runs,
        torch.tensor(token_slots, device=device),
        b_layout,
    )


def lora_linear(s: LoraInputs, path: str = "auto") -> None:
    """Ours: one LoRA linear, fused kernel or shrink + expand (`path`)."""
    sgmv.lora_linear(
        s.y,
        s.x,
        s.lora_a,
        s.lora_b,
        s.ranks,
        s.scales,
        s.linear.offsets,
        s.segments,
        path=path,
    )


def shrink(s: LoraInputs) -> None:
    sgmv.lora_shrink(s.x, s.lora_a, s.ranks, s.segments)


def expand(s: LoraInputs, v: torch.Tensor) -> None:
    sgmv.lora_expand(s.y, v, s.lora_b, s.ranks, s.scales, s.linear.offsets, s.segments)


def gather_bmm(s: LoraInputs) -> None:
    """Torch baseline 1: gather each token's A and B (padded to max_rank), then bmm."""
    a = s.lora_a[s.token_slots]  # [T, S*R, in]
    v = torch.bmm(a, s.x.unsqueeze(2))  # [T, S*R, 1]
    b = s.lora_b[s.token_slots]  # [T, out, R]
    scales = s.scales[s.token_slots]  # [T, S]
    r = s.max_rank
    for i, (lo, hi) in enumerate(itertools.pairwise(s.linear.offsets)):
        delta = torch.bmm(b[:, lo:hi], v[:, i * r : (i + 1) * r]).squeeze(2)
        s.y[:, lo:hi] += (delta * scales[:, i : i + 1]).to(s.y.dtype)


def segment_loop(s: LoraInputs, ranks: list[int], scales: list[float]) -> None:
    """Torch baseline 2: per run of one slot, one x·Aᵀ (A padded with zeros past the rank),
    then one addmm per slice up to the slot's rank."""
    r = s.max_rank
    offsets = s.linear.offsets
    for start, end, slot in s.runs:
        rank = ranks[slot]
        v = s.x[start:end] @ s.lora_a[slot].T  # [n, S*R]
        for i, (lo, hi) in enumerate(itertools.pairwise(offsets)):
            s.y[start:end, lo:hi].addmm_(
                v[:, i * r : i * r + rank],
                s.lora_b[slot, lo:hi, :rank].T,
                alpha=scales[slot],
            )


def floor_bytes(s: LoraInputs, slot_ranks: Sequence[int]) -> dict[str, int]:
    """The least traffic: inputs read once, each distinct adapter's rows once, outputs once.

    y is read and written (the ops add into it); v is the shrink's output and the expand's
    input, but no part of one LoRA linear's floor.
    """
    e = s.x.element_size()
    num_tokens, num_slices = s.x.shape[0], len(s.linear.widths)
    used = {slot for _, _, slot in s.runs}
    a_bytes = sum(slot_ranks[j] * num_slices * s.linear.in_features * e for j in used)
    b_bytes = sum(slot_ranks[j] * sum(s.linear.widths) * e for j in used)
    x_bytes = s.x.numel() * e
    y_bytes = 2 * s.y.numel() * e
    v_bytes = num_tokens * num_slices * s.max_rank * 4
    return {
        "shrink": x_bytes + a_bytes + v_bytes,
        "expand": v_bytes + b_bytes + y_bytes,
        "linear": x_bytes + a_bytes + b_bytes + y_bytes,
    }


def _stats(samples_ms: list[float]) -> dict:
    q = statistics.quantiles(samples_ms, n=10) if len(samples_ms) > 1 else samples_ms
    return {
        "median_us": 1e3 * statistics.median(samples_ms),
        "p10_us": 1e3 * q[0],
        "p90_us": 1e3 * q[-1],
        "samples_ms": samples_ms,
    }


def eager(fn: Callable[[], None], device: torch.device) -> dict:
    """Median of do_bench (L2 flushed before every call)."""
    if device.type != "cuda":
        samples = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - t0))
        return _stats(samples)
    import triton.testing

    fn()  # compile outside the timing
    samples = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="all")
    return _stats(list(samples))


class GraphTimer:
    """Times a list of calls captured in one CUDA graph, net of a replay's fixed cost."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = device.type == "cuda"
        if not self.enabled:
            return
        tiny = torch.zeros(1, device=device)
        self.replay_one_trivial = self._replay([lambda: tiny.add_(1)])
        many = self._replay([lambda: tiny.add_(1)] * 64)
        self.trivial_node_us = (
            many["median_us"] - self.replay_one_trivial["median_us"]
        ) / 63

    def _replay(self, calls: list[Callable[[], None]]) -> dict:
        import triton.testing

        for call in calls:
            call()  # compile and allocate outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        samples = triton.testing.do_bench(
            graph.replay, warmup=10, rep=60, return_mode="all"
        )
        del graph
        return _stats(list(samples))

    def per_call(self, calls: list[Callable[[], None]]) -> dict | None:
        """Per-call time of `calls` replayed in one graph, net of one trivial replay."""
        if not self.enabled:
            return None
        raw = self._replay(calls)
        net = (raw["median_us"] - self.replay_one_trivial["median_us"]) / len(calls)
        return {"per_call_us": net, "calls": len(calls), "replay": raw}


def copy_bandwidth(device: torch.device) -> dict:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    if device.type != "cuda":
        return {"gbps": float("nan")}
    src = torch.randn(256 * 2**20, device=device)
    dst = torch.empty_like(src)
    t = eager(lambda: dst.copy_(src), device)
    return {"gbps": 2 * src.numel() * 4 / (t["median_us"] * 1e3), **t}
