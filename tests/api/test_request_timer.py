"""RequestTimer: a request's time to first token, from the call's arrival, splits into
setup + queue + prefill + delivery."""

from __future__ import annotations

import pytest

from loraplex.api import request_timer
from loraplex.api.metrics import ApiMetrics
from loraplex.platform import RequestOutput


def sample(metrics: ApiMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels)


def test_time_to_first_token_counts_from_arrival_and_splits_into_its_phases(
    monkeypatch,
):
    now = [100.0]
    monkeypatch.setattr(request_timer.time, "monotonic", lambda: now[0])
    metrics = ApiMetrics("base")
    timer = metrics.timer("acme", "bot", arrived=99.5)  # parsed 0.5 s after arrival
    now[0] = 100.25
    timer.queued()  # setup 0.75 s
    now[0] = 101.0
    timer.observe(RequestOutput("r", [7], "a", False, None))  # first token: TTFT 1.5 s
    now[0] = 101.5
    timer.observe(
        RequestOutput(
            "r", [8], "b", True, None, [], 3, 2, 0, queue_s=0.125, prefill_s=0.5
        )
    )
    ttft = sample(metrics, "vllm:time_to_first_token_seconds_sum", model_name="base")
    assert ttft == pytest.approx(1.5)
    phases = {
        name: sample(metrics, f"loraplex_request_{name}_sum", tenant="acme")
        for name in ("setup_seconds", "queue_time_seconds", "prefill_time_seconds")
    }
    assert phases == {
        "setup_seconds": pytest.approx(0.75),
        "queue_time_seconds": pytest.approx(0.125),
        "prefill_time_seconds": pytest.approx(0.5),
    }
    delivery = sample(metrics, "loraplex_request_delivery_seconds_sum", tenant="acme")
    assert delivery == pytest.approx(1.5 - 0.75 - 0.125 - 0.5)
    e2e = sample(metrics, "vllm:e2e_request_latency_seconds_sum", model_name="base")
    assert e2e == pytest.approx(2.0)
