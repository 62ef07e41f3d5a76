"""One local Ray cluster for the replica tests, and servers run in this process."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn

ray = pytest.importorskip("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app, port: int):
    """Run an ASGI app under uvicorn on a thread; yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster (4 logical CPUs on any machine: replicas take 1 each) and
    Ray Serve with its HTTP proxy on a free port, for the importable application; shut
    down after the module, so no Ray process outlives the tests that use it."""
    from ray import serve

    ray.init(
        address="local",  # never a cluster this machine happens to run
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=150 << 20,
        log_to_driver=False,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
