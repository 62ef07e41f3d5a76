"""Prometheus families for where the engine thread's time goes (platform/step_times.py)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, Metric

from loraplex.platform import STEP_KINDS, THREAD_ACTIVITIES, EngineStats, StepTotals


def step_families(model_name: str, stats: EngineStats) -> Iterable[Metric]:
    """Steps, their wall seconds and tokens by kind; the thread's seconds outside steps.

    Mean step time of a kind is seconds ÷ steps between two scrapes; the share of the thread
    spent in each kind, or handing outputs to the HTTP side ("dispatch"), is its seconds over
    the scrape interval.
    """
    labels = ["model_name", "kind"]
    steps = CounterMetricFamily(
        "loraplex_engine_steps", "Engine steps run, by kind.", labels=labels
    )
    seconds = CounterMetricFamily(
        "loraplex_engine_step_seconds",
        "Wall seconds of engine steps (schedule to outputs), by kind.",
        labels=labels,
    )
    tokens = CounterMetricFamily(
        "loraplex_engine_step_tokens",
        "Tokens computed by engine steps (prompt chunks and decodes), by kind.",
        labels=labels,
    )
    waits = CounterMetricFamily(
        "loraplex_engine_step_gpu_wait_seconds",
        "Seconds of engine steps spent waiting for their sampled tokens (the GPU still "
        "running), by kind; the rest of a step's seconds is host work.",
        labels=labels,
    )
    for kind in STEP_KINDS:
        totals = stats.step_totals.get(kind, StepTotals())
        steps.add_metric([model_name, kind], totals.steps)
        seconds.add_metric([model_name, kind], totals.seconds)
        tokens.add_metric([model_name, kind], totals.tokens)
        waits.add_metric([model_name, kind], totals.gpu_wait)
    thread = CounterMetricFamily(
        "loraplex_engine_thread_seconds",
        "Engine-thread seconds outside steps: dispatch (outputs to their streams), "
        "calls (requests, aborts, slot writes), idle.",
        labels=["model_name", "activity"],
    )
    for activity in THREAD_ACTIVITIES:
        thread.add_metric(
            [model_name, activity], stats.thread_seconds.get(activity, 0.0)
        )
    yield from (steps, seconds, tokens, waits, thread)
