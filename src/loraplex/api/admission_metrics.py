"""Admission's series on /metrics: calls waiting, seats, per-tenant calls, the expected wait,
bypasses, fair-share preemptions, and whether a call waiting for an adapter slot holds the
others back."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .admission import Admission


class AdmissionCollector(Collector):
    """Reads `Admission.stats()` at scrape time."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def collect(self) -> Iterable[Metric]:
        stats = self.admission.stats()
        waiting = GaugeMetricFamily(
            "loraplex_admission_waiting", "Calls waiting for their turn to run."
        )
        waiting.add_metric([], stats.waiting)
        yield waiting
        seats = GaugeMetricFamily(
            "loraplex_admission_seats",
            "Engine requests admitted (used) and still open (free).",
            labels=["state"],
        )
        seats.add_metric(["used"], stats.seats_in_use)
        seats.add_metric(["free"], max(0, stats.seats - stats.seats_in_use))
        yield seats
        tenants = GaugeMetricFamily(
            "loraplex_admission_tenant_calls",
            "A tenant's calls admitted or waiting (its concurrency).",
            labels=["tenant"],
        )
        for tenant, count in sorted(stats.active_by_tenant.items()):
            tenants.add_metric([tenant], count)
        yield tenants
        expected = GaugeMetricFamily(
            "loraplex_admission_expected_wait_seconds",
            "How long a call arriving now would wait for its turn (measured rates).",
        )
        expected.add_metric([], stats.expected_wait_s)
        yield expected
        held = GaugeMetricFamily(
            "loraplex_admission_held",
            "1 while a call overtaken too often holds the others until it gets a slot.",
        )
        held.add_metric([], int(stats.held_for_slot))
        yield held
        bypassed = CounterMetricFamily(
            "loraplex_admission_bypassed",
            "Times a call waiting for an adapter slot was overtaken by a ready call.",
        )
        bypassed.add_metric([], stats.bypassed_total)
        yield bypassed
        preempted = CounterMetricFamily(
            "loraplex_admission_preempted",
            "Engine requests preempted (recomputed later) so that a waiting call of a "
            "tenant running fewer started at once.",
        )
        preempted.add_metric([], stats.preempted_total)
        yield preempted
