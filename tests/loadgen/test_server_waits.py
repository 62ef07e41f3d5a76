"""benchmarks/server_waits.py: the waits line from the /metrics histograms a phase moved."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "benchmarks" / "server_waits.py"
spec = importlib.util.spec_from_file_location("server_waits", SOURCE)
server_waits = importlib.util.module_from_spec(spec)
spec.loader.exec_module(server_waits)


def test_per_tenant_phases_and_the_loop_lag_of_all():
    moved = {
        "loraplex_request_setup_seconds_bucket{le=0.01,tenant=t1}": 3.0,
        "loraplex_request_setup_seconds_bucket{le=0.08,tenant=t1}": 4.0,
        "loraplex_request_setup_seconds_sum{tenant=t1}": 0.1,
        "loraplex_request_setup_seconds_count{tenant=t1}": 4.0,
        "loraplex_event_loop_lag_seconds_bucket{le=0.001}": 90.0,
        "loraplex_event_loop_lag_seconds_bucket{le=0.25}": 100.0,
        "loraplex_event_loop_lag_seconds_sum{}": 0.5,
        "loraplex_event_loop_lag_seconds_count{}": 100.0,
    }
    line = server_waits.wait_brief(moved)
    assert "setup[t1] mean 25.0 ms, p99 <= 80 ms" in line
    assert "loop lag[all] mean 5.0 ms, p99 <= 250 ms" in line
    assert server_waits.wait_brief({}) == ""
