"""Read the API's Prometheus registry into plain numbers, and quantiles from histogram buckets.

The UI reads the same CollectorRegistry that `/metrics` exports, so the page and a Prometheus
scrape never disagree. Quantiles follow PromQL's `histogram_quantile`: linear interpolation
inside the bucket that holds the rank.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

Buckets = tuple[tuple[float, float], ...]  # (upper bound, cumulative count), +Inf last


@dataclass(frozen=True)
class MetricsReading:
    """One scrape of the registry, summed over the labels the UI does not split by."""

    generation_tokens: float = 0.0
    prompt_tokens: float = 0.0
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    ttft: Buckets = ()
    itl: Buckets = ()
    e2e: Buckets = ()
    finished: dict[str, float] = field(default_factory=dict)  # finished_reason → n
    rejections: dict[str, float] = field(default_factory=dict)  # reason → n
    tenant_requests: dict[str, float] = field(default_factory=dict)  # tenant id → n
    tenant_tokens: dict[str, float] = field(default_factory=dict)  # tenant id → n
    step_counts: dict[str, float] = field(default_factory=dict)  # kind of step → n
    step_seconds: dict[str, float] = field(default_factory=dict)  # kind of step → s
    step_gpu_wait: dict[str, float] = field(default_factory=dict)  # kind of step → s
    thread_seconds: dict[str, float] = field(default_factory=dict)  # activity → s


def _histogram(samples: list[tuple[str, dict, float]], name: str) -> Buckets:
    by_bound: dict[float, float] = defaultdict(float)
    for sample, labels, value in samples:
        if sample == f"{name}_bucket":
            by_bound[float(labels["le"])] += value
    return tuple(sorted(by_bound.items()))


def read_metrics(registry: CollectorRegistry) -> MetricsReading:
    """Scrape `registry` once (this also reads the engine's gauges)."""
    samples = [
        (s.name, s.labels, s.value)
        for family in registry.collect()
        for s in family.samples
    ]

    def total(name: str) -> float:
        return sum(v for n, _, v in samples if n == name)

    def by(name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for n, labels, v in samples:
            if n == name:
                out[labels.get(label, "")] += v
        return dict(out)

    return MetricsReading(
        generation_tokens=total("vllm:generation_tokens_total"),
        prompt_tokens=total("vllm:prompt_tokens_total"),
        running=total("vllm:num_requests_running"),
        waiting=total("vllm:num_requests_waiting"),
        kv_usage=total("vllm:kv_cache_usage_perc"),
        ttft=_histogram(samples, "vllm:time_to_first_token_seconds"),
        itl=_histogram(samples, "vllm:inter_token_latency_seconds"),
        e2e=_histogram(samples, "vllm:e2e_request_latency_seconds"),
        finished=by("vllm:request_success_total", "finished_reason"),
        rejections=by("loraplex_rejections_total", "reason"),
        tenant_requests=by("loraplex_tenant_requests_total", "tenant"),
        tenant_tokens=by("loraplex_tenant_tokens_total", "tenant"),
        step_counts=by("loraplex_engine_steps_total", "kind"),
        step_seconds=by("loraplex_engine_step_seconds_total", "kind"),
        step_gpu_wait=by("loraplex_engine_step_gpu_wait_seconds_total", "kind"),
        thread_seconds=by("loraplex_engine_thread_seconds_total", "activity"),
    )


def bucket_delta(newer: Buckets, older: Buckets) -> Buckets:
    """The observations made between two readings of one histogram."""
    before = dict(older)
    return tuple((bound, count - before.get(bound, 0.0)) for bound, count in newer)


def quantile(q: float, buckets: Buckets) -> float | None:
    """PromQL's histogram_quantile over cumulative buckets; None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower  # the rank lies past the largest finite bound
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower
