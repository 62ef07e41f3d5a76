"""benchmarks/soak.py and benchmarks/load_streams.py run end to end on the CPU (--smoke), each
against a real `loraplex serve` in a child process: the GPU session must not be the first
time their plumbing runs. A server told to queue almost nothing makes load_streams fail, so
its verdict is seen to fail too. The longer soak is `-m slow`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, out: Path, *options: str, timeout: float = 150):
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--smoke"]
    command += ["--out", str(out), *options]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    (path,) = out.glob(f"{script.removesuffix('.py')}-cpu-*.json")
    return done, json.loads(path.read_text())


def verdicts(result: dict) -> dict[str, str]:
    return {name: v["verdict"] for name, v in result["verdicts"].items()}


def check_soak(done, out: dict) -> None:
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert out["verdict"] == "pass", verdicts(out)
    assert out["complete"] and out["capacity"]["failed"] == 0
    assert out["requests"]["ok"] == out["requests"]["sent"] > 100
    assert set(verdicts(out)) >= {"rss_bytes", "open_files", "data_bytes", "errors"}
    assert verdicts(out)["gpu_bytes"] == "n/a"  # no GPU here
    ops = {op["op"] for op in out["churn_ops"]}
    assert ops == {"upload", "replace", "delete"}, out["churn_ops"]
    moved = out["server_counters"]
    assert moved.get("loraplex_adapter_evictions_total{tier=device}", 0) > 0
    assert moved.get("loraplex_adapter_evictions_total{tier=host}", 0) > 0
    assert all(s["server_alive"] for s in out["samples"])
    assert "soak: PASS" in done.stdout and "rss_bytes" in done.stdout


def test_soak_smoke(tmp_path):
    done, out = run("soak.py", tmp_path, "--minutes", "0.5", "--warmup-s", "5")
    check_soak(done, out)
    assert len(out["samples"]) >= 12


@pytest.mark.slow
def test_soak_smoke_three_minutes(tmp_path):
    done, out = run("soak.py", tmp_path, "--minutes", "3", timeout=400)
    check_soak(done, out)
    flat = out["verdicts"]["rss_bytes"]
    assert flat["samples"] >= 60 and flat["last_max"] <= flat["limit"]


def test_load_streams_smoke(tmp_path):
    done, out = run("load_streams.py", tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert out["verdict"] == "pass", verdicts(out)
    assert out["summary"]["completed"] == 32 * 3
    assert out["summary"]["ttft_ms"]["p99"] > 0 and out["summary"]["itl_ms"]["p50"] > 0
    assert out["peak_calls_held"] >= 29
    assert out["idle"]["busy"] == {}
    assert "load_streams: PASS" in done.stdout


def test_load_streams_fails_when_the_server_refuses(tmp_path):
    done, out = run(
        "load_streams.py", tmp_path, "--serve-args", "--max-queued-requests 1"
    )
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-4000:]
    assert verdicts(out)["refusals"] == "fail"
    assert out["requests"]["refusals"] > 0
    assert out["requests"]["errors"] == 0  # a refusal with Retry-After is no error
    assert "load_streams: FAIL" in done.stdout
