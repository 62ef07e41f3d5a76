"""SIGTERM drains `loraplex serve`: readiness and new requests get 503, streams finish, exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
from server_utils import free_port


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become ready")


def test_sigterm_lets_streams_finish_then_exits_0(demo_assets, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "LORAPLEX_DEMO_DIR": str(demo_assets.root),
        "LORAPLEX_ADMIN_KEY": "admin-key",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loraplex",
            "serve",
            "--port",
            str(port),
            "--device",
            "cpu",
            "--data-dir",
            str(tmp_path / "data"),
            "--shutdown-timeout",
            "60",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        key = None
        for line in proc.stdout:
            if line.startswith("demo tenant key:"):
                key = line.split(":", 1)[1].strip()
                break
        assert key, "no demo key printed"
        assert "admin-key" not in line  # a configured admin key is never printed
        wait_ready(url, proc)
        headers = {"Authorization": f"Bearer {key}"}
        body = {
            "model": "pirate",
            "prompt": "Hi",
            "max_tokens": 300,
            "stream": True,
            "ignore_eos": True,
        }
        started = threading.Barrier(5)
        endings: list[list[str]] = []

        def stream() -> None:
            lines = []
            with httpx.stream(
                "POST", f"{url}/v1/completions", json=body, headers=headers, timeout=120
            ) as r:
                for i, line in enumerate(r.iter_lines()):
                    if i == 0:
                        started.wait()
                    if line:
                        lines.append(line)
            endings.append(lines)

        workers = [threading.Thread(target=stream) for _ in range(4)]
        for w in workers:
            w.start()
        started.wait(timeout=60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"{url}/readyz").status_code == 503
        refused = httpx.post(
            f"{url}/v1/completions",
            headers=headers,
            json={"model": "pirate", "prompt": "Hi", "max_tokens": 2},
        )
        assert refused.status_code == 503 and "Retry-After" in refused.headers
        for w in workers:
            w.join(120)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(endings) == 4
    for lines in endings:
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][len("data: ") :])
        assert last["choices"][0]["finish_reason"] == "length"
