"""benchmarks/bench_sgmv.py --smoke on the CPU, in Triton's interpreter: the mixed-ranks
section runs every row under both layouts of B side by side, and the report prints each row's
layout, so that the GPU run is not the first time this plumbing runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from interpreter import QUIET, skip_without_interpreter

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_mixed_ranks_under_both_b_layouts(tmp_path):
    skip_without_interpreter()
    command = [sys.executable, *QUIET, str(ROOT / "benchmarks" / "bench_sgmv.py")]
    command += [str(tmp_path), "--smoke", "--only", "mixed_ranks"]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("bench_sgmv-cpu-*.json")
    result = json.loads(path.read_text())
    assert result["errors"] == []
    assert result["config"]["b_layout"] == "rank_major"
    rows = [(m["phase"], m["b_layout"]) for m in result["mixed_ranks"]]
    assert rows == [
        ("decode", "rank_major"),
        ("decode", "out_major"),
        ("prefill", "rank_major"),
        ("prefill", "out_major"),
    ]
    assert all(m["linear_eager"]["ratio"] > 0 for m in result["mixed_ranks"])
    # Every case, the uniform runs of each ideal included, says its layout.
    layouts = [c["b_layout"] for c in result["cases"]]
    assert layouts.count("rank_major") == layouts.count("out_major") == 8
    report = [line for line in done.stdout.splitlines() if "T=6 qkv" in line]
    assert len(report) == 2 and "rank_major" in report[0] and "out_major" in report[1]
