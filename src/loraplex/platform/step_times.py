"""StepTimes: where the engine thread's time goes, by kind of step, since start.

A served GPU engine can be far slower than its decode step suggests (steps with a prefill
chunk run eagerly, output callbacks compete with the HTTP event loop for the GIL). These
totals let a scrape of /metrics tell which: the count, wall seconds and tokens of each kind of
step, and the thread's own seconds outside steps.

Kinds of step:
- "decode_graph": decode tokens only, replayed from a CUDA graph;
- "decode_eager": decode tokens only, run eagerly (no graphs, or a batch above every bucket);
- "chunk_graph": at least one prompt chunk, replayed from a CUDA graph (mixed_graphs.py);
- "prefill": at least one prompt chunk (with or without decodes), run eagerly.
Of each step's wall time, `gpu_wait` is the part spent waiting for its sampled tokens (the one
device→host copy, where the host waits for what the GPU still runs); the rest is host work
(schedule, input fill, launches, sampler, outputs). A kind whose steps wait little is host-bound.
Thread activities outside steps: "dispatch" (handing outputs to their callbacks), "calls"
(requests, aborts and slot writes run between steps), "idle" (waiting for work).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

STEP_KINDS = ("decode_graph", "decode_eager", "chunk_graph", "prefill")
THREAD_ACTIVITIES = ("dispatch", "calls", "idle")


@dataclass(frozen=True)
class StepTotals:
    """One kind of step since start: how many, their wall seconds, their scheduled tokens,
    and the seconds of those walls spent waiting for the sampled tokens."""

    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    gpu_wait: float = 0.0

    def __add__(self, other: StepTotals) -> StepTotals:
        return StepTotals(
            self.steps + other.steps,
            self.seconds + other.seconds,
            self.tokens + other.tokens,
            self.gpu_wait + other.gpu_wait,
        )


@dataclass
class StepTimes:
    """Running totals kept by the engine thread (the only writer); read as snapshots."""

    steps: dict[str, StepTotals] = field(
        default_factory=lambda: {kind: StepTotals() for kind in STEP_KINDS}
    )
    thread_seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(THREAD_ACTIVITIES, 0.0)
    )

    def record(
        self, kind: str, started: float, tokens: int, gpu_wait: float = 0.0
    ) -> None:
        """One step of `kind` that began at perf_counter() `started` and ends now, of which
        `gpu_wait` seconds went waiting for its sampled tokens."""
        seconds = time.perf_counter() - started
        self.steps[kind] = self.steps[kind] + StepTotals(1, seconds, tokens, gpu_wait)

    def record_thread(self, activity: str, seconds: float) -> None:
        self.thread_seconds[activity] += seconds

    def snapshot(self) -> tuple[dict[str, StepTotals], dict[str, float]]:
        return dict(self.steps), dict(self.thread_seconds)


def merge_steps(*parts: dict[str, StepTotals]) -> dict[str, StepTotals]:
    """Totals of several engines (replicas), kind by kind."""
    out: dict[str, StepTotals] = {}
    for part in parts:
        for kind, totals in part.items():
            out[kind] = out.get(kind, StepTotals()) + totals
    return out


def merge_seconds(*parts: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = out.get(key, 0.0) + value
    return out
