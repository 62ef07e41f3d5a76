"""One function per page, each returning plain data: the template renders it, and the page's
`.json` twin returns it as it is, so the two can never disagree."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

from loraplex.adapters_registry import views
from loraplex.adapters_registry.migrations import ADAPTER_STATES, EVENT_KINDS

from .history import History, engine_time, latency, series, tokens_per_s
from .metrics_read import quantile, read_metrics
from .state import AdminUiState

PER_PAGE_CHOICES = (25, 50, 100, 200)
ACTIVITY_WINDOW_S = 30 * 60  # the pool page's loads/evictions chart
ACTIVITY_BUCKET_S = 60


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _tenant_choices(state: AdminUiState) -> list[dict]:
    return [
        {"id": t.id, "name": t.name} for t in state.services.registry.tenants.list()
    ]


def overview(state: AdminUiState, history: History) -> dict:
    """Readiness, the base model, uptime, load, throughput, latency, errors and rejections."""
    points = history.record(lambda: read_metrics(state.metrics_registry))
    last = len(points) - 1
    now = points[last].reading
    thread = state.engine_thread
    stats = thread.stats()
    draining = state.is_draining()
    status = "ready"
    if not thread.alive:
        status = "engine down"
    elif draining:
        status = "draining"
    elif not state.services.writable():  # the same checks as /readyz
        status = "registry unavailable"
    pool_metrics = state.services.pool.metrics.snapshot()
    return {
        "model": state.model_name,
        "ready": status == "ready",
        "status": status,
        "engine_error": repr(thread.error) if thread.error is not None else None,
        "uptime_s": round(time.time() - state.started_at, 1),
        "running": stats.num_running,
        "waiting": stats.num_waiting,
        "preemptions": stats.num_preemptions,
        "kv_blocks": stats.num_kv_blocks,
        "kv_blocks_free": stats.num_free_kv_blocks,
        "kv_usage": round(now.kv_usage, 4),
        "tokens_per_s": tokens_per_s(points, last),
        "generated_tokens": now.generation_tokens,
        "prompt_tokens": now.prompt_tokens,
        "latency": latency(points, last),  # the last minute
        "engine_time": engine_time(points, last),  # the last minute
        "latency_since_start": {
            "ttft_p50_ms": _ms(quantile(0.5, now.ttft)),
            "ttft_p99_ms": _ms(quantile(0.99, now.ttft)),
            "itl_p50_ms": _ms(quantile(0.5, now.itl)),
            "itl_p99_ms": _ms(quantile(0.99, now.itl)),
        },
        "finished": now.finished,
        "rejections": now.rejections,
        "load_failures": pool_metrics["failures"],
        "pool_exhausted": pool_metrics["exhausted"],
        "series": series(points),
    }


def tenants(state: AdminUiState) -> dict:
    """Every tenant with its keys (records, never the keys) and its usage."""
    registry = state.services.registry
    reading = read_metrics(state.metrics_registry)
    usage = views.tenant_usage(state.services)
    rows = []
    for tenant in registry.tenants.list():
        row = views.tenant_dict(tenant, registry.tenants.api_keys(tenant.id))
        own = usage.get(tenant.id, {})
        row["usage"] = {
            "requests": int(reading.tenant_requests.get(tenant.id, 0)),
            "tokens": int(reading.tenant_tokens.get(tenant.id, 0)),
            "errors": own.get("errors", 0),
            "adapters": own.get("adapters", 0),
            "bytes": own.get("bytes", 0),
        }
        rows.append(row)
    return {"tenants": rows}


@dataclass(frozen=True)
class AdapterQuery:
    """The adapters page's filters, sort and page, checked against what is allowed."""

    tenant: str = ""
    state: str = ""
    q: str = ""
    where: str = ""
    pinned: str = ""  # "", "yes" or "no"
    sort: str = "created"
    order: str = "desc"
    page: int = 1
    per_page: int = 50

    @classmethod
    def parse(cls, params: dict[str, str]) -> AdapterQuery:
        """Unknown or malformed values fall back to the defaults (a page never fails)."""

        def pick(name: str, allowed, default: str = "") -> str:
            value = params.get(name, default)
            return value if value in allowed else default

        def number(name: str, default: int) -> int:
            value = params.get(name, "")
            return int(value) if value.isdigit() and 0 < int(value) < 10**6 else default

        per_page = number("per_page", 50)
        return cls(
            tenant=params.get("tenant", "")[:64],
            state=pick("state", ADAPTER_STATES),
            q=params.get("q", "")[:64],
            where=pick("where", views.WHERE_CHOICES),
            pinned=pick("pinned", ("yes", "no")),
            sort=pick("sort", views.ADAPTER_SORTS, "created"),
            order=pick("order", ("asc", "desc"), "desc"),
            page=number("page", 1),
            per_page=per_page if per_page in PER_PAGE_CHOICES else 50,
        )


def adapters(state: AdminUiState, query: AdapterQuery) -> dict:
    """One page of every tenant's adapters, filtered and sorted server-side."""
    found = views.adapter_page(
        state.services,
        tenant=query.tenant or None,
        state=query.state or None,
        q=query.q or None,
        where=query.where or None,
        pinned={"yes": True, "no": False}.get(query.pinned),
        sort=query.sort,
        descending=query.order == "desc",
        offset=(query.page - 1) * query.per_page,
        limit=query.per_page,
    )
    return {
        "query": asdict(query),
        "total": found["total"],
        "page": query.page,
        "pages": max(1, math.ceil(found["total"] / query.per_page)),
        "data": found["data"],
        "tenants": _tenant_choices(state),
        "states": list(ADAPTER_STATES),
        "sorts": list(views.ADAPTER_SORTS),
        "max_upload_bytes": state.max_upload_bytes,
    }


def memory_split(state: AdminUiState) -> dict:
    """Bytes of the engine's device memory: model weights, adapter slots and the KV cache."""
    engine = state.engine_thread.engine
    weights = sum(
        t.numel() * t.element_size()
        for t in (*engine.model.parameters(), *engine.model.buffers())
    )
    slots = engine.lora_slots.num_bytes if engine.lora_slots is not None else 0
    split = {
        "device": str(engine.device),
        "weights": weights,
        "adapter_slots": slots,
        "kv_cache": engine.kv_cache.num_bytes,
        "total": None,  # the device's capacity, known on CUDA only
    }
    if engine.device.type == "cuda":
        import torch  # only here: the CPU build of the UI never needs it

        split["total"] = torch.cuda.get_device_properties(engine.device).total_memory
    return split


def _hit_rates(snapshot: dict) -> dict:
    rates = {}
    for tier in ("device", "host"):
        hits, misses = snapshot["hits"].get(tier, 0), snapshot["misses"].get(tier, 0)
        rate = hits / (hits + misses) if hits + misses else None
        rates[tier] = {"hits": hits, "misses": misses, "rate": rate}
    return rates


def pool(state: AdminUiState, memory: dict) -> dict:
    """The device slots as a grid, the host tier, hit rates, activity and memory split."""
    snapshot = state.services.pool.metrics.snapshot()
    now = time.time()
    since = now - ACTIVITY_WINDOW_S
    buckets = int(ACTIVITY_WINDOW_S // ACTIVITY_BUCKET_S)
    activity: dict[str, list] = {
        "t_min": [i - buckets + 1 for i in range(buckets)],  # minutes, 0 = this one
        "loads": [0] * buckets,
        "device_evictions": [0] * buckets,
        "host_evictions": [0] * buckets,
    }
    for row in views.pool_activity(state.services, since, ACTIVITY_BUCKET_S):
        if 0 <= row["bucket"] < buckets:
            activity[row["what"]][row["bucket"]] += row["n"]
    return {
        **views.slot_grid(state.services),
        "now": now,
        "hit_rates": _hit_rates(snapshot),
        "loads": snapshot["loads"],
        "evictions": snapshot["evictions"],
        "failures": snapshot["failures"],
        "exhausted": snapshot["exhausted"],
        "activity": activity,
        "memory": memory,
    }


def events(
    state: AdminUiState,
    tenant: str = "",
    adapter: str = "",
    kind: str = "",
    before: int | None = None,
    limit: int = 100,
) -> dict:
    """The registry's event log, newest first, filtered by tenant, adapter and kind."""
    kind = kind if kind in EVENT_KINDS else ""
    rows = views.events_page(
        state.services,
        tenant=tenant[:64] or None,
        adapter=adapter[:64] or None,
        kind=kind or None,
        before=before,
        limit=limit,
    )
    return {
        "query": {"tenant": tenant, "adapter": adapter, "kind": kind},
        "data": rows,
        "next_before": rows[-1]["id"] if len(rows) == limit else None,
        "tenants": _tenant_choices(state),
        "kinds": list(EVENT_KINDS),
    }
