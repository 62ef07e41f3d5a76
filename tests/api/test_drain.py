"""SIGTERM drains `loraplex serve`: readiness and new requests get 503, the 20 streams in flight
finish, an upload whose body arrived completes, one still sending is cut and leaves nothing
behind (no row in progress, no temp file), and the process exits 0."""

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

from loraplex.adapters_registry import AdapterRegistry, RegistryConfig
from loraplex.loadgen import BaseShapes, random_adapter
from loraplex.platform import ModelSpec

STREAMS = 20


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


def slow_upload(url, key, name, files, seconds: float, result: dict, stop):
    """POST a multipart upload whose body trickles in over `seconds` (or until `stop`)."""
    request = httpx.Request(
        "POST", f"{url}/v1/adapters", data={"name": name}, files=files
    )
    body = request.read()
    pieces = 50

    def trickle():
        step = -(-len(body) // pieces)
        for i in range(0, len(body), step):
            yield body[i : i + step]
            if stop.wait(seconds / pieces):
                return

    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": request.headers["Content-Type"],
    }
    try:
        response = httpx.post(
            f"{url}/v1/adapters", content=trickle(), headers=headers, timeout=120
        )
        result[name] = response.status_code
    except httpx.HTTPError as exc:
        result[name] = type(exc).__name__


def test_sigterm_lets_streams_and_uploads_finish_then_exits_0(demo_assets, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spool = tmp_path / "spool"  # where the server spools upload bodies
    spool.mkdir()
    env = {
        **os.environ,
        "LORAPLEX_DEMO_DIR": str(demo_assets.root),
        "LORAPLEX_ADMIN_KEY": "admin-key",
        "PYTHONUNBUFFERED": "1",
        "TMPDIR": str(spool),
    }
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplex", "serve", "--port", str(port)]
        + ["--device", "cpu", "--data-dir", str(data_dir), "--shutdown-timeout", "60"]
        + ["--max-lora-rank", "32"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    shapes = BaseShapes.from_model_dir(demo_assets.model)
    config, weights = random_adapter(shapes, 32, seed=1, dtype="float32")
    files = {
        "config": ("adapter_config.json", config),
        "weights": ("adapter_model.safetensors", weights),
    }
    uploads: dict = {}
    stop = threading.Event()
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
            "max_tokens": 150,
            "stream": True,
            "ignore_eos": True,
        }
        started = threading.Barrier(STREAMS + 1)
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

        workers = [threading.Thread(target=stream) for _ in range(STREAMS)]
        # One upload's body ends just after SIGTERM; one's would take far longer than
        # the drain.
        workers += [
            threading.Thread(
                target=slow_upload,
                args=(url, key, name, files, seconds, uploads, stop),
            )
            for name, seconds in (("in-time", 2.0), ("too-slow", 600.0))
        ]
        for w in workers:
            w.start()
        started.wait(timeout=60)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"{url}/readyz").status_code == 503
        refused = httpx.post(
            f"{url}/v1/completions",
            headers=headers,
            json={"model": "pirate", "prompt": "Hi", "max_tokens": 2},
        )
        assert refused.status_code == 503 and "Retry-After" in refused.headers
        for w in workers[:STREAMS]:
            w.join(120)
        assert proc.wait(60) == 0
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    for w in workers[STREAMS:]:
        w.join(30)
    assert len(endings) == STREAMS
    for lines in endings:
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][len("data: ") :])
        assert last["choices"][0]["finish_reason"] == "length"
    assert uploads["in-time"] == 201
    assert uploads["too-slow"] != 201  # cut when the server stopped
    # Nothing half-done: a restart finds nothing to repair, and no spooled body is left.
    assert list(spool.iterdir()) == []
    registry = AdapterRegistry(
        RegistryConfig(data_dir, 32), ModelSpec.from_dir(demo_assets.model)
    )
    try:
        assert not registry.startup_report.changed, registry.startup_report
        states = {a.name: a.state for a in registry.catalog.list_adapters()}
        assert states["in-time"] == "ready" and "too-slow" not in states
        assert registry.store.temp_entries() == []
    finally:
        registry.close()
