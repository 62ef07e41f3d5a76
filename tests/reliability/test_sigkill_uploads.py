"""SIGKILL of `loraplex serve` while clients upload, replace and delete adapters over HTTP,
trial after trial on one data directory: after every restart the catalog and the files agree
(no stuck upload, no temp file, no orphan, every stored file hashes right), every upload the
server acknowledged (201) is there with its content, and every acknowledged delete is done.

tests/adapters_registry/test_crash_recovery.py kills the registry alone; this kills the whole
server (multipart parsing, the API's worker threads, collection after replace and delete).
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
from server_child import SMALLEST, serve_until_killed

from api.server_utils import free_port
from loraplex.adapters_registry import AdapterRegistry, RegistryConfig, UploadLimits
from loraplex.adapters_registry.sweep import sweep
from loraplex.platform import ModelSpec

ADMIN = {"Authorization": "Bearer admin-key"}


@dataclass
class Ledger:
    """What the clients asked for, and what the server acknowledged, over all trials."""

    sent: dict[str, set[str]] = field(default_factory=dict)  # name → digests sent
    acked: dict[str, str] = field(default_factory=dict)  # name → acknowledged digest
    deleted: set[str] = field(default_factory=set)  # acknowledged deletes
    deleting: set[str] = field(default_factory=set)  # deletes sent (maybe not done)
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, name: str, digest: str) -> None:
        with self.lock:
            self.sent.setdefault(name, set()).add(digest)

    def answer(self, name: str, response: httpx.Response, ok: tuple[int, ...]) -> None:
        with self.lock:
            if response.status_code == 201:
                self.acked[name] = response.json()["sha256"]
                self.deleted.discard(name)
            elif response.status_code == 204:
                self.acked.pop(name, None)
                self.deleted.add(name)
            if response.status_code not in ok:
                self.unexpected.append(
                    f"{name}: {response.status_code} {response.text}"
                )


def clients(url, key, trial, contents, invalid, ledger, stop) -> list[threading.Thread]:
    """Uploads of new names (some invalid), replaces of one name, uploads then deletes."""
    headers = {"Authorization": f"Bearer {key}"}
    rng = random.Random(trial)

    def upload(http, name, content, replace=False, ok=(201, 422)):
        ledger.send(name, content.sha256)
        data = {"name": name, "replace": str(replace).lower()}
        response = http.post("/v1/adapters", data=data, files=content.files())
        ledger.answer(name, response, ok)
        return response

    def loop(body) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
            for k in itertools.count():
                if stop.is_set():
                    return
                try:
                    body(http, k)
                except httpx.HTTPError:
                    return  # the server is gone

    def fresh(http, k):
        bad = k % 5 == 4
        content = invalid if bad else rng.choice(contents)
        upload(http, f"t{trial}-u{k}", content)

    def rolling(http, k):
        upload(http, "rolling", contents[k % len(contents)], replace=True, ok=(201,))

    def churn(http, k):
        name = f"t{trial}-d{k}"
        if upload(http, name, rng.choice(contents), ok=(201,)).status_code == 201:
            ledger.deleting.add(name)
            ledger.answer(name, http.delete(f"/v1/adapters/{name}"), (204,))

    return [threading.Thread(target=loop, args=(f,)) for f in (fresh, rolling, churn)]


def start_server(forkserver, model, data_dir):
    started, port = forkserver.Event(), free_port()
    child = forkserver.Process(
        target=serve_until_killed, args=(model, data_dir, port, started)
    )
    child.start()
    assert started.wait(60), "the server did not start"
    return child, f"http://127.0.0.1:{port}"


def restart_and_check(data_dir, spec, ledger) -> bool:
    """Open the registry as a restarting server does (its startup sweep), then check it.
    Returns whether the sweep found an interrupted upload to fail."""
    config = RegistryConfig(
        data_dir, SMALLEST["max_lora_rank"], UploadLimits(max_upload_bytes=1 << 30)
    )
    registry = AdapterRegistry(config, spec)
    try:
        catalog, store = registry.catalog, registry.store
        assert catalog.query("PRAGMA integrity_check")[0]["integrity_check"] == "ok"
        rows = catalog.list_adapters()
        assert {r.state for r in rows} <= {"ready", "failed"}, {r.state for r in rows}
        ready = {r.name: r for r in rows if r.state == "ready"}
        assert len(ready) == sum(r.state == "ready" for r in rows), "two ready versions"
        for digest in {r.sha256 for r in ready.values()}:
            assert store.problem(digest) is None, digest
        assert set(store.stored()) == {r.sha256 for r in ready.values()}, "orphans"
        assert store.temp_entries() == []
        assert all(r.error for r in rows if r.state == "failed")
        for name, digest in ledger.acked.items():  # nothing acknowledged is lost
            if name in ledger.deleting and name not in ready:
                continue  # its delete was sent: it may have happened
            assert name in ready, f"acknowledged upload {name} is gone"
            expected = ledger.sent[name] if name == "rolling" else {digest}
            assert ready[name].sha256 in expected, name
        for name in ledger.deleted:
            assert name not in ready, f"acknowledged delete of {name} undone"
        for name, row in ready.items():
            assert row.sha256 in ledger.sent[name], f"{name} holds what nobody sent"
        assert not sweep(catalog, store, full_hash=True).changed
        return bool(registry.startup_report.failed_uploads)
    finally:
        registry.close()


@pytest.mark.parametrize(
    "trials",
    [pytest.param(25, id="25"), pytest.param(100, id="100", marks=pytest.mark.slow)],
)
def test_sigkill_during_uploads_loses_nothing(
    trials, forkserver, demo_assets, contents, invalid, tmp_path
):
    data_dir, model = tmp_path / "data", demo_assets.model
    spec = ModelSpec.from_dir(model)
    ledger, rng = Ledger(), random.Random(trials)
    child, url = start_server(forkserver, model, data_dir)
    tenant = httpx.post(
        f"{url}/admin/api/tenants", json={"name": "acme"}, headers=ADMIN
    )
    key = httpx.post(
        f"{url}/admin/api/tenants/{tenant.json()['id']}/keys", json={}, headers=ADMIN
    ).json()["key"]
    interrupted = 0
    for trial in range(trials):
        stop = threading.Event()
        threads = clients(url, key, trial, contents, invalid, ledger, stop)
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        stop.set()
        for t in threads:
            t.join(15)
        assert child.exitcode == -signal.SIGKILL
        assert not ledger.unexpected, ledger.unexpected[:3]
        interrupted += restart_and_check(data_dir, spec, ledger)
        child, url = start_server(forkserver, model, data_dir)
    # The server after the last kill serves what was acknowledged.
    headers = {"Authorization": f"Bearer {key}"}
    listed = httpx.get(f"{url}/v1/adapters", headers=headers).json()["data"]
    assert {a["name"] for a in listed} >= set(ledger.acked) - ledger.deleting
    reply = httpx.post(
        f"{url}/v1/completions",
        json={"model": "rolling", "prompt": "Hi", "max_tokens": 2},
        headers=headers,
    )
    assert reply.status_code == 200, reply.text
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    assert len(ledger.acked) >= trials, "too few uploads got through"
    assert interrupted >= trials // 5, "too few kills landed in the middle of an upload"
