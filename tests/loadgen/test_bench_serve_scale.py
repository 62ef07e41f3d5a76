"""benchmarks/bench_serve_scale.py runs end to end on the CPU (--smoke): the GPU run must not
be the first time its plumbing is exercised."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_writes_every_figure(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_serve_scale.py")]
    command += ["--out", str(tmp_path), "--smoke", "--sizes", "2,6"]
    command += ["--requests", "10", "--ttft-requests", "8", "--fair-requests", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("bench_serve_scale-cpu-*.json")
    out = json.loads(path.read_text())
    assert set(out["scale"]) == {"2", "6"}
    for run in out["scale"].values():
        assert run["summary"]["completed"] == 10 and run["summary"]["errors"] == {}
    six = out["scale"]["6"]["server"]  # 6 adapters through 4 slots: evictions
    assert six.get("loraplex_adapter_evictions_total{tier=device}", 0) > 0
    # Every phase says where the engine thread's time went: 10 requests of prompts and
    # decodes ran prefill and (eager, CPU) decode steps within the phase's wall time.
    steps = [v for k, v in six.items() if k.startswith("loraplex_engine_steps_total")]
    assert sum(steps) > 0 and six["phase_seconds"] > 0
    assert (
        "steps: " in done.stdout
        and "dispatch" in done.stdout
        and "host " in done.stdout
    )
    # ... and where its adapter loads' time went, by move, slot writes included.
    assert six.get("loraplex_adapter_load_seconds_count{move=slot_write}", 0) > 0
    assert "loads: " in done.stdout and "slot_write" in done.stdout
    assert out["ttft"]["p50_ttft_ratio"] > 0
    assert out["fairness"]["flood"]["steady"]["errors"] == {}
    assert out["meta"]["card"] == "cpu"
    assert "p50 TTFT all resident" in done.stdout
