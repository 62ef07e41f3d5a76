"""Where a benchmark phase's requests waited on the server, from the /metrics histograms it moved
(bench_serve_scale.py): admission, the engine's queue, prefill."""

from __future__ import annotations


def wait_brief(moved: dict) -> str:
    """Where the phase's requests waited, per tenant, from the server's histograms: mean and
    p99 (the upper bound of the bucket holding it) of admission, setup (admission, pin and
    hand-over), engine queue, prefill and delivery; and the event loop's lag (all tenants)."""
    parts = []
    for what, name in (
        ("admission", "loraplex_admission_wait_seconds"),
        ("setup", "loraplex_request_setup_seconds"),
        ("queue", "loraplex_request_queue_time_seconds"),
        ("prefill", "loraplex_request_prefill_time_seconds"),
        ("delivery", "loraplex_request_delivery_seconds"),
        ("loop lag", "loraplex_event_loop_lag_seconds"),
    ):
        by_tenant: dict[str, dict] = {}
        for key, value in moved.items():
            if not key.startswith(name + "_"):
                continue
            pairs = key[key.index("{") + 1 : -1].split(",")
            labels = dict(kv.split("=", 1) for kv in pairs if kv)
            entry = by_tenant.setdefault(labels.get("tenant", "all"), {"buckets": {}})
            if key.startswith(name + "_bucket"):
                le = float(labels["le"])
                entry["buckets"][le] = entry["buckets"].get(le, 0.0) + value
            elif key.startswith(name + "_sum"):
                entry["sum"] = entry.get("sum", 0.0) + value
            else:
                entry["count"] = entry.get("count", 0.0) + value
        for tenant, entry in sorted(by_tenant.items()):
            count = entry.get("count", 0.0)
            if not count:
                continue
            p99 = next(
                (le for le, n in sorted(entry["buckets"].items()) if n >= 0.99 * count),
                float("inf"),
            )
            mean_ms = 1e3 * entry.get("sum", 0.0) / count
            parts.append(
                f"{what}[{tenant}] mean {mean_ms:.1f} ms, p99 <= {1e3 * p99:.0f} ms"
            )
    return "waits: " + "; ".join(parts) if parts else ""
