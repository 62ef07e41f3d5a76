"""Ingest end to end: two files or one archive, dedup by content, versions, delete, corruption."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile

import pytest
import torch
from registry_fakes import FakeWriter
from registry_files import CONFIG, WEIGHTS, read_files

from loraplex.adapters_registry import (
    AdapterCorrupt,
    AdapterNotReady,
    PoolConfig,
    UploadPart,
    load_adapter_dir,
    verify,
)


def zipped(files) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(CONFIG, files.config)
        zf.writestr(WEIGHTS, files.weights)
    return buf.getvalue()


def tarred(files) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in ((CONFIG, files.config), (WEIGHTS, files.weights)):
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_ingest_two_files_records_everything(registry, tenant, good, spec):
    adapter = registry.ingest(tenant.id, "support-bot", good.parts())
    assert adapter.state == "ready" and adapter.version == 1
    assert (adapter.rank, adapter.alpha, adapter.targets) == (
        8,
        16.0,
        ("q", "v", "down"),
    )
    assert adapter.size_bytes == len(good.config) + len(good.weights)
    stored = registry.store.path_of(adapter.sha256)
    assert sorted(p.name for p in stored.iterdir()) == [CONFIG, WEIGHTS]
    assert (stored / WEIGHTS).read_bytes() == good.weights
    assert registry.store.temp_entries() == []
    assert [e.kind for e in registry.catalog.events(adapter.id)] == [
        "validated",
        "uploaded",
    ]
    loaded = registry.load_weights(adapter.id)
    direct = load_adapter_dir(stored, spec, 16)
    for key, module in direct.modules.items():
        assert torch.equal(loaded.modules[key].lora_a, module.lora_a)
        assert loaded.modules[key].scale == module.scale == 2.0


def test_the_sha256_is_streamed_over_both_files(registry, tenant, good):
    adapter = registry.ingest(tenant.id, "bot", good.parts())
    files = {
        CONFIG: hashlib.sha256(good.config).hexdigest(),
        WEIGHTS: hashlib.sha256(good.weights).hexdigest(),
    }
    manifest = "".join(f"{n}\0{files[n]}\n" for n in (CONFIG, WEIGHTS))
    assert adapter.sha256 == hashlib.sha256(manifest.encode()).hexdigest()


@pytest.mark.parametrize("pack,name", [(zipped, "bot.zip"), (tarred, "bot.tar.gz")])
def test_archives_hold_the_same_adapter_and_are_deduplicated(
    registry, tenant, good, pack, name
):
    plain = registry.ingest(tenant.id, "plain", good.parts())
    packed = registry.ingest(
        tenant.id, "packed", [UploadPart(name, io.BytesIO(pack(good)))]
    )
    assert packed.state == "ready" and packed.sha256 == plain.sha256
    assert registry.store.stored() == [plain.sha256]  # one copy on disk
    assert registry.store.temp_entries() == []


def test_a_new_version_replaces_the_old_once_nothing_uses_it(
    registry, tenant, good, adapter_dirs
):
    other = read_files(adapter_dirs["b"])
    v1 = registry.ingest(tenant.id, "bot", good.parts())
    pool = registry.make_pool(PoolConfig(max_loras=2, max_cpu_loras=2), FakeWriter())
    pool.acquire(v1.id)  # a request is running on version 1
    v2 = registry.ingest(tenant.id, "bot", other.parts())
    assert registry.resolve(tenant.id, "bot").id == v2.id
    assert registry.catalog.get(v1.id).state == "deleting"
    assert registry.collect(pool.in_use) == []  # still in use: kept
    assert registry.store.path_of(v1.sha256).exists()
    pool.release(v1.id)
    assert registry.collect(pool.in_use) == [v1.id]
    assert pool.evict(v1.id)
    assert not registry.store.path_of(v1.sha256).exists()
    assert registry.store.stored() == [v2.sha256]
    pool.close()


def test_delete_keeps_files_another_row_shares(registry, tenant, good):
    a = registry.ingest(tenant.id, "a", good.parts())
    registry.ingest(tenant.id, "b", good.parts())
    assert [r.state for r in registry.delete(tenant.id, "a")] == ["deleting"]
    with pytest.raises(AdapterNotReady, match="'a' is deleting"):
        registry.resolve(tenant.id, "a")
    assert registry.collect(lambda _: False) == [a.id]
    assert registry.store.stored() == [a.sha256]  # "b" still uses the same files
    registry.delete(tenant.id, "b")
    registry.collect(lambda _: False)
    assert registry.store.stored() == []
    assert registry.catalog.list_adapters(tenant.id) == []


def test_an_adapter_id_is_never_given_again(registry, tenant, good):
    """The newest row removed, a new upload still gets a new id: ids are keys of the pool and
    of concurrent collects, so a reused one could name another adapter."""
    registry.ingest(tenant.id, "a", good.parts())
    b = registry.ingest(tenant.id, "b", good.parts())
    registry.delete(tenant.id, "b")
    assert registry.collect(lambda _: False) == [b.id]
    c = registry.ingest(tenant.id, "c", good.parts())
    assert c.id > b.id


def test_a_flipped_byte_is_refused_on_the_next_load_and_marked_corrupt(
    registry, tenant, good
):
    adapter = registry.ingest(tenant.id, "bot", good.parts())
    twin = registry.ingest(tenant.id, "twin", good.parts())  # same files
    path = registry.store.path_of(adapter.sha256) / WEIGHTS
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside a tensor: the file still parses
    path.write_bytes(bytes(data))
    events = []
    pool = registry.make_pool(PoolConfig(max_loras=1, max_cpu_loras=1), FakeWriter())
    pool.listener = lambda *e: events.append(e)
    with pytest.raises(AdapterCorrupt, match="changed on disk"):
        pool.acquire(adapter.id)
    assert registry.catalog.get(adapter.id).state == "corrupt"
    assert registry.catalog.get(twin.id).state == "corrupt"
    assert "changed on disk" in registry.catalog.get(adapter.id).error
    assert registry.catalog.events(adapter.id)[0].kind == "corrupt"
    with pytest.raises(AdapterNotReady, match="'bot' is corrupt"):
        registry.resolve(tenant.id, "bot")
    with pytest.raises(AdapterNotReady):
        pool.acquire(twin.id)
    assert pool.snapshot() == [] and events == []  # nothing loaded, slot free
    pool.close()


def test_verify_finds_a_changed_file_while_the_server_runs(registry, tenant, good):
    adapter = registry.ingest(tenant.id, "bot", good.parts())
    path = registry.store.path_of(adapter.sha256) / CONFIG
    path.write_bytes(path.read_bytes().replace(b'"r": 8', b'"r": 9'))
    report = verify(registry.config.data_dir)
    assert report.checked == 1
    assert report.corrupt == ((adapter.id, "its bytes no longer match their sha256"),)
    assert registry.catalog.get(adapter.id).state == "corrupt"
    assert verify(registry.config.data_dir).corrupt == ()  # already marked
