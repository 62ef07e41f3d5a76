"""SIGKILL at random points of ingest, delete and collect; the startup sweep must leave the
catalog and the files consistent every time.

The child processes fork from a forkserver that has imported the registry once, so each of the
kills costs milliseconds of start-up rather than an interpreter and torch import.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import random
import signal
import tarfile
import time

import pytest
from crash_child import run_until_killed
from registry_files import CONFIG, WEIGHTS, open_registry, read_files

from loraplex.adapters_registry.sweep import sweep

KILLS = 30


def tar_gz(files) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in ((CONFIG, files.config), (WEIGHTS, files.weights)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def uploads(adapter_dirs):
    a, b, c = (read_files(adapter_dirs[k]) for k in "abc")
    bad = a.with_config(r=64)
    return [
        ("alpha", [(CONFIG, a.config), (WEIGHTS, a.weights)]),
        ("beta", [("beta.tar.gz", tar_gz(b))]),
        ("gamma", [(CONFIG, c.config), (WEIGHTS, c.weights)]),
        ("alpha-copy", [(CONFIG, a.config), (WEIGHTS, a.weights)]),
        ("broken", [(CONFIG, bad.config), (WEIGHTS, bad.weights)]),
    ]


def assert_consistent(registry) -> None:
    catalog, store = registry.catalog, registry.store
    assert catalog.query("PRAGMA integrity_check")[0]["integrity_check"] == "ok"
    rows = catalog.list_adapters()
    assert {r.state for r in rows} <= {"ready", "failed"}, [r.state for r in rows]
    ready = [r for r in rows if r.state == "ready"]
    for row in ready:
        assert store.problem(row.sha256) is None, row
    assert set(store.stored()) == {r.sha256 for r in ready}
    assert store.temp_entries() == []
    names = [r.name for r in ready]
    assert len(names) == len(set(names)), "two ready versions of one name"
    assert all(r.error for r in rows if r.state == "failed")
    assert not sweep(catalog, store, full_hash=True).changed  # nothing left to repair


@pytest.mark.slow
def test_sigkill_during_ingest_leaves_a_consistent_registry(
    tmp_path, model_dir, spec, adapter_dirs
):
    ctx = multiprocessing.get_context("forkserver")
    # Python 3.11's forkserver imports its preloads before it sets sys.path, so only
    # installed modules can be preloaded (crash_child itself is imported by each child).
    ctx.set_forkserver_preload(["loraplex.adapters_registry.registry"])
    data_dir, plan = tmp_path / "data", uploads(adapter_dirs)
    rng = random.Random(4)
    repaired = interrupted = 0
    for i in range(KILLS):
        started = ctx.Event()
        child = ctx.Process(
            target=run_until_killed, args=(data_dir, model_dir, plan, i, started)
        )
        child.start()
        assert started.wait(30), "the child did not start"
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        registry = open_registry(data_dir, spec)  # runs the startup sweep
        try:
            assert_consistent(registry)
            repaired += registry.startup_report.changed
            interrupted += bool(registry.startup_report.failed_uploads)
        finally:
            registry.close()
    assert repaired >= KILLS // 3, "too few kills landed in the middle of something"
    assert interrupted >= KILLS // 5, "too few kills landed in the middle of an upload"
    registry = open_registry(data_dir, spec)
    tenant = registry.tenants.by_name("acme")
    adapter = registry.ingest(tenant.id, "after", read_files(adapter_dirs["a"]).parts())
    assert registry.load_weights(adapter.id).max_rank == 8  # and it still works
    registry.close()
