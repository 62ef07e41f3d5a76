"""One local Ray cluster for the replica tests."""

from __future__ import annotations

import pytest
from replica_utils import free_port

ray = pytest.importorskip("ray")


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
