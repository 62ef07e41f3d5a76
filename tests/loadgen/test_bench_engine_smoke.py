"""benchmarks/bench_engine.py end to end on the CPU (--smoke): the GPU run must not be the first
time its plumbing runs, the mixed step (decodes plus a prompt chunk) included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_writes_decode_mixed_and_prefill_figures(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_engine.py")]
    command += ["--out", str(tmp_path), "--smoke"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_engine.json").read_text())
    assert {(r["batch"], r["distinct_adapters"]) for r in result["decode"]} >= {(4, 1)}
    mixed = result["mixed"]
    assert mixed["batch"] == 4 and mixed["chunk_tokens"] == 64
    for step in (mixed["mixed_step"], mixed["decode_step"]):
        assert 0 < step["forward_host_ms"] <= step["wall_ms"]
    assert result["prefill"]["tokens"] == 64
    assert "-token chunk (eager): step" in done.stdout
