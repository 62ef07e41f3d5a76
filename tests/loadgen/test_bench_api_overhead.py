"""benchmarks/bench_api_overhead.py end to end on the CPU, small: the faked step is what the
server's engine steps take, and every figure of the table is filled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_faked_steps_set_the_pace_and_every_figure_is_written(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_api_overhead.py")]
    command += ["--out", str(tmp_path), "--streams", "2,6", "--output-len", "12"]
    command += ["--step-ms", "25", "--adapters", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("LORAPLEX_BENCH_FAKE_STEP_MS", None)
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("bench_api_overhead-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["streams"] for r in rows] == [2, 6]
    for row in rows:
        assert row["errors"] == {}
        decode = row["engine"]["steps"]["decode_graph"]
        prefill = row["engine"]["steps"]["prefill"]
        # 2 requests a stream of 12 tokens: at least 11 decode steps, each at least the
        # faked 25 ms (the real forward would take ~1 ms on this model)
        assert decode["steps"] >= 11 and decode["mean_ms"] >= 25
        assert prefill["steps"] >= 1 and prefill["mean_ms"] >= 25
        assert row["tpot_ms"]["p50"] >= 24
    assert "TPOT p50" in done.stdout
