"""Run a real `loraplex serve` server (built by serve.build_server) on a free port, in-process."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from loraplex import serve
from loraplex.serve_settings import ServeSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model: Path, data_dir: Path, **options):
    """Yields (base_url, Server); the admin key is `admin-key`."""
    settings = ServeSettings(
        data_dir=data_dir,
        port=free_port(),
        device="cpu",
        dtype="float32",
        admin_key="admin-key",
        **options,
    )
    server = serve.build_server(settings, model, say=lambda _: None)
    config = uvicorn.Config(
        server.app, host="127.0.0.1", port=settings.port, log_level="warning"
    )
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not runner.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{settings.port}", server
    finally:
        runner.should_exit = True
        thread.join(10)
        server.close()
