"""Prometheus metrics: vLLM-compatible series (so gateways and dashboards work) and loraplex's own.

Every series lives in one CollectorRegistry per app (not the process-global one), so that tests
and several apps in one process never mix their numbers. Label sets are bounded: model names are
the base model and registered adapters, tenants are created by the operator, reasons and tiers
are fixed lists.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from loraplex.platform import EngineStats

from .admission_metrics import AdmissionCollector
from .request_timer import RequestTimer
from .step_metrics import step_families

# Where a call's time to first token goes, by tenant (beside the admission wait).
_CALL_PHASES = (
    ("loraplex_request_setup_seconds", "Arrival to engine requests queued."),
    ("loraplex_request_queue_time_seconds", "Engine queue to first scheduled."),
    ("loraplex_request_prefill_time_seconds", "First scheduled step to first token."),
    ("loraplex_request_delivery_seconds", "The rest of the time to first token."),
)
_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


class _EngineCollector(Collector):
    """Gauges read from the engine's snapshot at scrape time."""

    def __init__(
        self,
        model_name: str,
        stats: Callable[[], EngineStats],
        slot_names: Callable[[Iterable[int]], list[str]],
        max_loras: int,
        queued: Callable[[], int] = lambda: 0,
    ):
        self.model_name = model_name
        self.stats = stats
        self.slot_names = slot_names
        self.max_loras = max_loras
        self.queued = queued  # calls waiting in admission, before the engine

    def collect(self) -> Iterable[Metric]:
        stats = self.stats()
        labels = ["model_name"]
        for name, value, doc in (
            (
                "vllm:num_requests_running",
                stats.num_running,
                "Requests in the running batch.",
            ),
            (
                "vllm:num_requests_waiting",
                stats.num_waiting + self.queued(),
                "Requests waiting to run (in admission or in the engine).",
            ),
            (
                "vllm:kv_cache_usage_perc",
                1 - stats.num_free_kv_blocks / max(stats.num_kv_blocks, 1),
                "Fraction of KV-cache blocks in use (0-1).",
            ),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            gauge.add_metric([self.model_name], value)
            yield gauge
        yield from _prefix_cache_families(self.model_name, stats)
        yield from step_families(self.model_name, stats)
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Adapters of running and waiting requests (value: scrape time).",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        running = ",".join(sorted(set(self.slot_names(stats.running_slots))))
        waiting = ",".join(sorted(set(self.slot_names(stats.waiting_slots))))
        info.add_metric([running, waiting, str(self.max_loras)], time.time())
        yield info


def _prefix_cache_families(model_name: str, stats: EngineStats) -> Iterable[Metric]:
    """Prefix-cache counters in tokens (vLLM v1's names and counting), and cached blocks."""
    for name, value, doc in (
        (
            "vllm:prefix_cache_queries",
            stats.prefix_cache_queries,
            "Prompt tokens looked up in the prefix cache (admitted requests).",
        ),
        (
            "vllm:prefix_cache_hits",
            stats.prefix_cache_hits,
            "Prompt tokens served from the prefix cache.",
        ),
    ):
        counter = CounterMetricFamily(name, doc, labels=["model_name"])
        counter.add_metric([model_name], value)
        yield counter
    blocks = GaugeMetricFamily(
        "loraplex_prefix_cache_blocks",
        "KV blocks holding a cached prefix: in_use (referenced) or evictable (LRU).",
        labels=["state"],
    )
    evictable = stats.num_evictable_kv_blocks
    blocks.add_metric(["in_use"], stats.num_cached_kv_blocks - evictable)
    blocks.add_metric(["evictable"], evictable)
    yield blocks


class _TenantCacheCollector(Collector):
    """Per tenant: prompt tokens served from the prefix cache, and their share of all prompt
    tokens (both counted as requests finish)."""

    def __init__(self) -> None:
        self.prompt: dict[str, int] = {}
        self.cached: dict[str, int] = {}

    def add(self, tenant: str, prompt_tokens: int, cached_tokens: int) -> None:
        self.prompt[tenant] = self.prompt.get(tenant, 0) + prompt_tokens
        self.cached[tenant] = self.cached.get(tenant, 0) + cached_tokens

    def collect(self) -> Iterable[Metric]:
        prompt, cached = dict(self.prompt), dict(self.cached)
        hits = CounterMetricFamily(
            "loraplex_tenant_prefix_cache_hits",
            "Prompt tokens served from the prefix cache, per tenant.",
            labels=["tenant"],
        )
        ratio = GaugeMetricFamily(
            "loraplex_tenant_prefix_cache_hit_ratio",
            "Share of a tenant's prompt tokens served from the prefix cache (0-1).",
            labels=["tenant"],
        )
        for tenant in sorted(prompt):
            hits.add_metric([tenant], cached.get(tenant, 0))
            ratio.add_metric([tenant], cached.get(tenant, 0) / max(prompt[tenant], 1))
        yield hits
        yield ratio


class _PoolCollector(Collector):
    """The adapter pool's slots, hits, loads, evictions and load latency, read at scrape time."""

    def __init__(self, pool) -> None:
        self.pool = pool

    def collect(self) -> Iterable[Metric]:
        entries = self.pool.snapshot()
        on_device = [e for e in entries if e.on_device]
        slots = GaugeMetricFamily(
            "loraplex_adapter_slots", "Device adapter slots by state.", labels=["state"]
        )
        slots.add_metric(["used"], len(on_device))
        slots.add_metric(["pinned"], sum(1 for e in on_device if e.pins > 0))
        slots.add_metric(["free"], self.pool.config.max_loras - len(on_device))
        yield slots
        host = GaugeMetricFamily(
            "loraplex_adapter_host_entries", "Adapters held in host memory."
        )
        host.add_metric([], sum(1 for e in entries if e.host_bytes))
        yield host
        stats = self.pool.metrics.snapshot()
        for key, name, doc, label in (
            ("hits", "loraplex_adapter_hits", "Acquires served by a tier.", "tier"),
            (
                "misses",
                "loraplex_adapter_misses",
                "Acquires a tier could not serve.",
                "tier",
            ),
            (
                "evictions",
                "loraplex_adapter_evictions",
                "Adapters evicted from a tier.",
                "tier",
            ),
            ("loads", "loraplex_adapter_loads", "Adapter moves between tiers.", "move"),
            (
                "failures",
                "loraplex_adapter_load_failures",
                "Adapter moves that failed.",
                "move",
            ),
            (
                "bytes_moved",
                "loraplex_adapter_bytes_moved",
                "Bytes of adapter moves.",
                "move",
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=[label])
            for value_label, value in sorted(stats[key].items()):
                family.add_metric([value_label], value)
            yield family
        exhausted = CounterMetricFamily(
            "loraplex_adapter_pool_exhausted",
            "Acquires refused: every slot stayed pinned.",
        )
        exhausted.add_metric([], stats["exhausted"])
        yield exhausted
        latency = HistogramMetricFamily(
            "loraplex_adapter_load_seconds",
            "Time of one adapter move.",
            labels=["move"],
        )
        for move, hist in sorted(stats["latency_seconds"].items()):
            buckets = [(str(le), count) for le, count in hist["buckets"].items()]
            buckets.append(("+Inf", hist["count"]))
            latency.add_metric([move], buckets, sum_value=hist["sum"])
        yield latency


class ApiMetrics:
    """The API's request-level series; `observe` is fed every output of every request."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        labels = ["model_name"]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between two output tokens.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Request latency, arrival to last token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens",
            "Prompt tokens processed.",
            labels,
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens",
            "Tokens generated.",
            labels,
            registry=self.registry,
        )
        self.success = Counter(
            "vllm:request_success",
            "Finished requests by reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.tenant_requests = Counter(
            "loraplex_tenant_requests",
            "Requests per tenant and adapter (or base).",
            ["tenant", "model"],
            registry=self.registry,
        )
        self.tenant_tokens = Counter(
            "loraplex_tenant_tokens",
            "Prompt and generated tokens per tenant.",
            ["tenant", "kind"],
            registry=self.registry,
        )
        self.uploads = Counter(
            "loraplex_uploads",
            "Adapter uploads by result (ready, or the refusal's status code).",
            ["result"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "loraplex_rejections",
            "Requests refused, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.tenant_cache = _TenantCacheCollector()
        self.registry.register(self.tenant_cache)
        self.admission_wait = Histogram(
            "loraplex_admission_wait_seconds",
            "Time from arrival to admission, by tenant and where the adapter was.",
            ["tenant", "residency"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.setup_time, self.queue_time, self.prefill_time, self.delivery_time = (
            Histogram(
                n, h, ["tenant"], buckets=_LATENCY_BUCKETS, registry=self.registry
            )
            for n, h in _CALL_PHASES
        )
        self.loop_lag = Histogram(
            "loraplex_event_loop_lag_seconds",
            "How much later than asked the API's event loop woke for a 10 ms timer.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._admission = None  # the collector of the admission being exported

    def watch_pool(self, pool) -> None:
        """Export the adapter pool's state and counters (an AdapterPool)."""
        self.registry.register(_PoolCollector(pool))

    def watch_engine(
        self,
        stats: Callable[[], EngineStats],
        slot_names: Callable[[Iterable[int]], list[str]],
        max_loras: int,
    ) -> None:
        queued = self._admission_waiting
        self.registry.register(
            _EngineCollector(self.model_name, stats, slot_names, max_loras, queued)
        )

    def watch_admission(self, admission) -> None:
        """Export an Admission's series; a later one (a rebuilt ApiState) replaces it."""
        if self._admission is not None:
            self.registry.unregister(self._admission)
        self._admission = AdmissionCollector(admission)
        self.registry.register(self._admission)
        wait = self.admission_wait
        admission.waits.append(lambda t, where, s: wait.labels(t, where).observe(s))

    def _admission_waiting(self) -> int:
        return self._admission.admission.stats().waiting if self._admission else 0

    def timer(
        self, tenant: str, model: str, arrived: float | None = None
    ) -> RequestTimer:
        """The latency bookkeeping of one engine request of a call that `arrived` then
        (time.monotonic(); default now)."""
        self.tenant_requests.labels(tenant, model).inc()
        return RequestTimer(self, tenant, arrived)
