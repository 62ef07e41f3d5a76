"""From request records to the figures of a run: throughput, latency percentiles, goodput."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from .client import RequestRecord

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el")
_LATENCIES = (
    ("ttft", "Time to first token"),
    ("tpot", "Time per output token (excl. 1st)"),
    ("itl", "Inter-token latency"),
    ("e2el", "End-to-end latency"),
)


def parse_goodput(specs: Sequence[str]) -> dict[str, float]:
    """`ttft:MS tpot:MS e2el:MS` → {metric: milliseconds}.

    :raises ValueError: an unknown metric or a value that is not a positive number.
    """
    slos = {}
    for spec in specs:
        name, _, value = spec.partition(":")
        if name not in SLO_METRICS:
            raise ValueError(f"goodput {spec!r}: the metric is one of {SLO_METRICS}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"goodput {spec!r}: use METRIC:MILLISECONDS") from None
        if slos[name] <= 0:
            raise ValueError(f"goodput {spec!r}: the bound must be positive")
    return slos


def stats_ms(values_s: Iterable[float]) -> dict[str, float | None]:
    """Mean, standard deviation and percentiles, in milliseconds (None when empty)."""
    values = np.asarray([v for v in values_s if v is not None], dtype=np.float64)
    keys = ["mean", "std"] + [f"p{p}" for p in PERCENTILES]
    if values.size == 0:
        return dict.fromkeys(keys)
    ms = values * 1000.0
    row = {"mean": float(ms.mean()), "std": float(ms.std())}
    for p in PERCENTILES:
        row[f"p{p}"] = float(np.percentile(ms, p))
    return row


def meets(record: RequestRecord, slos: dict[str, float]) -> bool:
    """Whether a finished request met every SLO (milliseconds)."""
    if not record.ok:
        return False
    values = {"ttft": record.ttft_s, "tpot": record.tpot_s, "e2el": record.e2el_s}
    for name, bound_ms in slos.items():
        value = values[name]
        if value is not None and value * 1000.0 > bound_ms:
            return False
    return True


def summarize(
    records: Sequence[RequestRecord], duration_s: float, slos: dict[str, float]
) -> dict:
    """The figures of a run (latencies of finished requests only)."""
    ok = [r for r in records if r.ok]
    duration = max(duration_s, 1e-9)
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    summary = {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(sorted(Counter(r.outcome for r in records if not r.ok).items())),
        "duration_s": duration_s,
        "prompt_tokens": prompt,
        "output_tokens": output,
        "request_throughput": len(ok) / duration,
        "output_throughput": output / duration,
        "total_token_throughput": (prompt + output) / duration,
    }
    summary.update(_latencies(ok))
    if slos:
        good = sum(meets(r, slos) for r in ok)
        summary["goodput"] = {
            "slo_ms": slos,
            "good_requests": good,
            "request_goodput": good / duration,
        }
    summary["by_tenant"] = _grouped(records, lambda r: f"tenant{r.tenant}")
    summary["by_kind"] = _grouped(records, lambda r: r.kind)
    return summary


def _latencies(ok: Sequence[RequestRecord]) -> dict:
    return {
        "ttft_ms": stats_ms(r.ttft_s for r in ok),
        "tpot_ms": stats_ms(r.tpot_s for r in ok),
        "itl_ms": stats_ms(v for r in ok for v in r.itl_s),
        "e2el_ms": stats_ms(r.e2el_s for r in ok),
    }


def _grouped(records: Sequence[RequestRecord], key) -> dict:
    groups: dict[str, list[RequestRecord]] = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    out = {}
    for name in sorted(groups):
        rows = groups[name]
        ok = [r for r in rows if r.ok]
        out[name] = {
            "requests": len(rows),
            "completed": len(ok),
            "errors": dict(
                sorted(Counter(r.outcome for r in rows if not r.ok).items())
            ),
            "ttft_ms": stats_ms(r.ttft_s for r in ok),
            "e2el_ms": stats_ms(r.e2el_s for r in ok),
        }
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(summary: dict, title: str = "Serving benchmark") -> str:
    """The summary as a fixed-width table, in the layout of `vllm bench serve`."""
    width = 60
    lines = [f" {title} ".center(width, "=")]

    def row(label: str, value: object) -> None:
        lines.append(f"{label:<44}{value:>16}")

    row("Successful requests:", summary["completed"])
    row("Failed requests:", summary["failed"])
    for outcome, count in summary["errors"].items():
        row(f"  {outcome}:", count)
    row("Benchmark duration (s):", _fmt(summary["duration_s"]))
    row("Total input tokens:", summary["prompt_tokens"])
    row("Total generated tokens:", summary["output_tokens"])
    row("Request throughput (req/s):", _fmt(summary["request_throughput"]))
    if "goodput" in summary:
        row("Request goodput (req/s):", _fmt(summary["goodput"]["request_goodput"]))
    row("Output token throughput (tok/s):", _fmt(summary["output_throughput"]))
    row("Total token throughput (tok/s):", _fmt(summary["total_token_throughput"]))
    for key, title_text in _LATENCIES:
        stats = summary[f"{key}_ms"]
        lines.append(f" {title_text} ".center(width, "-"))
        row(f"Mean {key.upper()} (ms):", _fmt(stats["mean"]))
        for p in PERCENTILES:
            row(f"P{p} {key.upper()} (ms):", _fmt(stats[f"p{p}"]))
    if len(summary["by_tenant"]) > 1 or len(summary["by_kind"]) > 1:
        lines.append(" By tenant and adapter kind ".center(width, "-"))
        lines.append(f"{'':<14}{'ok':>8}{'failed':>8}{'P50 TTFT':>15}{'P99 TTFT':>15}")
        for name, group in {**summary["by_tenant"], **summary["by_kind"]}.items():
            failed = group["requests"] - group["completed"]
            lines.append(
                f"{name:<14}{group['completed']:>8}{failed:>8}"
                f"{_fmt(group['ttft_ms']['p50']):>15}{_fmt(group['ttft_ms']['p99']):>15}"
            )
    lines.append("=" * width)
    return "\n".join(lines)
