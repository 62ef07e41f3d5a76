"""The soak's verdicts, from its samples: is each resource flat, were there errors, is the
server idle at the end. Pure Python, so the rules are unit-tested on synthetic series.

Flatness rule (per resource): drop the samples of the warm-up (t < warmup_s), cut the rest
into three equal spans of time, and call the resource flat when

    max(last third) <= max(first third) * (1 + rel) + abs

with (rel, abs) from TOLERANCES. Maxima, not means: a leak raises the peaks, and a peak
that comes back (an upload in flight, a burst of connections) is what `abs` allows for.
Fewer than MIN_SAMPLES_PER_THIRD samples in a third is "inconclusive" (the run was too
short to judge), which fails the soak like "fail" does; a resource never measured (GPU
memory on a CPU host) is "n/a", which does not. The slope over the kept samples (least
squares, per hour) is reported beside each verdict as a hint, never judged.
"""

from __future__ import annotations

MIB = 1 << 20
MIN_SAMPLES_PER_THIRD = 3
PASSING = ("pass", "n/a")


def tolerances(adapter_bytes: int) -> dict[str, tuple[float, float]]:
    """Resource → (rel, abs): how much the last third's peak may exceed the first's.

    - rss_bytes: the server's resident memory (VmRSS), host tier of adapters included.
    - threads: thread pools grow up to their caps under bursts (asyncio's default executor
      is min(32, cores + 4)), hence the wide abs; a thread per request or upload still shows.
    - open_files: descriptors but sockets (files, pipes, eventfds...): should not move once
      warm. Sockets follow the load (one per client connection), so they are not judged by
      flatness: soak.py checks instead that all descriptors are back to their count before
      the load once the server is idle.
    - data_bytes / data_files: the whole --data-dir (registry database and its WAL, which
      SQLite lets grow to ~4 MB before a checkpoint, stored adapters, tmp/). The churn keeps
      a fixed number of adapters, so one upload in flight and one replaced version not yet
      collected may be there: two adapters of slack.
    - temp_bytes / temp_files: the data dir's tmp/ and the server's TMPDIR (spooled
      uploads): empty when idle; at most one upload in flight, spooled and copied into
      tmp/, and a superseded version renamed into tmp/ to be removed: three adapters.
    - gpu_bytes: device memory in use (the KV cache and slots are allocated at start).
    """
    return {
        "rss_bytes": (0.10, 64 * MIB),
        "threads": (0.10, 32),
        "open_files": (0.10, 8),
        "data_bytes": (0.10, 2 * adapter_bytes + 8 * MIB),
        "data_files": (0.10, 8),
        "temp_bytes": (0.0, 3 * adapter_bytes + MIB),
        "temp_files": (0.0, 8),
        "gpu_bytes": (0.05, 256 * MIB),
    }


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t seconds, value) points, in value per hour."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 3600.0


def flatness(
    series: list[tuple[float, float | None]], warmup_s: float, rel: float, abs_: float
) -> dict:
    """The flatness rule (module docstring) on one resource's (t seconds, value) samples."""
    points = [(t, v) for t, v in series if t >= warmup_s and v is not None]
    if not points:
        return {"verdict": "n/a", "reason": "not measured"}
    start, end = points[0][0], points[-1][0]
    third = (end - start) / 3
    first = [v for t, v in points if t <= start + third]
    last = [v for t, v in points if t >= end - third]
    out = {
        "samples": len(points),
        "rel": rel,
        "abs": abs_,
        "slope_per_hour": slope_per_hour(points),
    }
    if third <= 0 or min(len(first), len(last)) < MIN_SAMPLES_PER_THIRD:
        return {
            **out,
            "verdict": "inconclusive",
            "reason": f"fewer than {MIN_SAMPLES_PER_THIRD} samples in a third "
            "after the warm-up: run longer or sample more often",
        }
    first_max, last_max = max(first), max(last)
    limit = first_max * (1 + rel) + abs_
    return {
        **out,
        "first_max": first_max,
        "last_max": last_max,
        "limit": limit,
        "growth": last_max - first_max,
        "growth_pct": 100.0 * (last_max - first_max) / first_max if first_max else None,
        "verdict": "pass" if last_max <= limit else "fail",
    }


def resource_verdicts(
    samples: list[dict], warmup_s: float, adapter_bytes: int
) -> dict[str, dict]:
    """Resource → its flatness verdict, over samples that carry `t` and each resource."""
    out = {}
    for name, (rel, abs_) in tolerances(adapter_bytes).items():
        series = [(s["t"], s.get(name)) for s in samples]
        out[name] = flatness(series, warmup_s, rel, abs_)
    return out


def count_verdict(count: int, allowed: int, what: str) -> dict:
    """`count` of something against the most allowed."""
    return {
        "verdict": "pass" if count <= allowed else "fail",
        "count": count,
        "allowed": allowed,
        "what": what,
    }


def overall(verdicts: dict[str, dict]) -> str:
    """The soak's verdict: pass when every verdict passes or does not apply."""
    return "pass" if all(v["verdict"] in PASSING for v in verdicts.values()) else "fail"


def verdict_table(verdicts: dict[str, dict]) -> list[str]:
    """One line per verdict: name, verdict, and the numbers behind it."""
    rows = []
    for name, v in verdicts.items():
        if "first_max" in v:
            detail = (
                f"first third max {_num(v['first_max'], name)}, last "
                f"{_num(v['last_max'], name)} (limit {_num(v['limit'], name)})"
            )
        elif "count" in v:
            detail = f"{v['count']} {v['what']} (allowed {v['allowed']})"
        else:
            detail = v.get("reason", "")
        rows.append(f"{name:<14} {v['verdict']:<12} {detail}")
    return rows


def _num(value: float, name: str) -> str:
    if name.endswith("_bytes"):
        return f"{value / MIB:.1f} MiB"
    return f"{value:.0f}"


def soak_table(out: dict) -> str:
    """soak.py's closing table: the run, its requests, the churn, every verdict."""
    rows = [f"soak: {out.get('verdict', 'fail').upper()}  ({out['meta']['device']})"]
    if "rate" in out:
        capacity = out.get("capacity", {}).get("req_s")
        rows.append(
            f"rate {out['rate']:.2f} req/s"
            + (f" (capacity {capacity:.2f} req/s)" if capacity else "")
            + f" for {out.get('soak_s', 0) / 60:.1f} min; warm-up {out['warmup_s']:.0f} s"
        )
    if "summary" in out:
        r, s = out["requests"], out["summary"]
        rows.append(
            f"requests {r['sent']}: ok {r['ok']}, errors {r['errors']} "
            f"{r['errors_by_outcome'] or ''}, refusals {r['refusals']} "
            f"{r['refusals_by_status'] or ''}, skipped {r['skipped']}"
        )
        rows.append(
            f"TTFT p50 {s['ttft_ms']['p50'] or 0:.1f} ms p99 {s['ttft_ms']['p99'] or 0:.1f}"
            f" ms; TPOT p50 {s['tpot_ms']['p50'] or 0:.2f} ms"
        )
    ops = out.get("churn_ops", [])
    kinds = {k: sum(o["op"] == k for o in ops) for k in ("upload", "replace", "delete")}
    busy = sum(o.get("streaming", 0) > 0 for o in ops)
    rows.append(
        f"churn: {kinds}, {busy} deletes while the adapter streamed, "
        f"failed {sum(not o['ok'] for o in ops)}"
    )
    rows += verdict_table(out["verdicts"])
    return "\n".join(rows)
