"""The SQLite catalog: migrations, tenants, hashed API keys, adapter states, the event log."""

from __future__ import annotations

import hmac
import sqlite3

import pytest

from loraplex.adapters_registry import (
    AdapterNotFound,
    AdapterNotReady,
    Catalog,
    NameInvalid,
    TenantExists,
    TenantNotFound,
    Tenants,
)
from loraplex.adapters_registry.migrations import MIGRATIONS


@pytest.fixture
def catalog(tmp_path):
    clock = iter(range(1000, 10**6))
    cat = Catalog(tmp_path / "registry.db", clock=lambda: float(next(clock)))
    yield cat
    cat.close()


@pytest.fixture
def tenants(catalog):
    return Tenants(catalog, touch_interval_s=0)


def test_migrations_use_wal_a_busy_timeout_and_apply_once(tmp_path, catalog):
    assert catalog.query("PRAGMA journal_mode")[0]["journal_mode"] == "wal"
    assert catalog.query("PRAGMA busy_timeout")[0]["timeout"] == 5000
    assert catalog.query("PRAGMA foreign_keys")[0]["foreign_keys"] == 1
    again = Catalog(tmp_path / "registry.db")  # a second open applies nothing new
    assert [m.name for m in MIGRATIONS.applied(again.db)] == [
        "m001_tenants_keys_adapters_events",
        "m002_tenant_deletion",
        "m003_adapter_ids_never_reused",
    ]
    assert {"tenants", "api_keys", "adapters", "events"} <= set(again.db.table_names())
    again.close()


def test_m003_keeps_every_row_and_starts_ids_past_any_logged_one():
    """A registry of before m003: its rows survive the table rebuild, and new ids start past
    the largest id the adapters table or the event log ever held."""
    import sqlite3

    from sqlite_utils import Database

    from loraplex.adapters_registry import migrations

    db = Database(sqlite3.connect(":memory:"))
    migrations.m001_tenants_keys_adapters_events(db)
    migrations.m002_tenant_deletion(db)
    db.execute("INSERT INTO tenants (id, name, created_at) VALUES ('t', 'acme', 0)")
    for i, name in ((3, "a"), (5, "b")):
        db.execute(
            "INSERT INTO adapters (id, tenant_id, name, version, state, upload_id, "
            "created_at, updated_at) VALUES (?, 't', ?, 1, 'ready', ?, 0, 0)",
            [i, name, f"u{i}"],
        )
    db.execute("INSERT INTO events (at, kind, adapter_id) VALUES (0, 'deleted', 9)")
    migrations.m003_adapter_ids_never_reused(db)
    rows = db.execute("SELECT id, name FROM adapters ORDER BY id").fetchall()
    assert rows == [(3, "a"), (5, "b")]
    db.execute(
        "INSERT INTO adapters (tenant_id, name, version, state, upload_id, created_at, "
        "updated_at) VALUES ('t', 'c', 1, 'uploading', 'u-new', 0, 0)"
    )
    assert db.execute("SELECT id FROM adapters WHERE name = 'c'").fetchone() == (10,)


def test_tenants_have_unique_valid_names(tenants):
    acme = tenants.create("acme")
    assert tenants.get(acme.id) == acme == tenants.by_name("acme")
    with pytest.raises(TenantExists, match="'acme' exists already"):
        tenants.create("acme")
    with pytest.raises(NameInvalid):
        tenants.create("../etc")
    with pytest.raises(TenantNotFound):
        tenants.get("nope")
    assert [t.name for t in tenants.list()] == ["acme"]


def test_api_keys_are_stored_hashed_and_compared_in_constant_time(
    tenants, catalog, monkeypatch
):
    acme = tenants.create("acme")
    key, record = tenants.create_api_key(acme.id, "ci")
    assert key.startswith("lpx-") and len(key) == 47 and record.prefix == key[:10]
    dump = "\n".join(catalog.db.conn.iterdump())
    assert key not in dump and key[10:] not in dump  # only the hash is stored

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(
        hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b)
    )
    assert tenants.authenticate(key) == acme
    assert tenants.authenticate(key[:-1] + "x") is None
    assert tenants.authenticate("") is None
    assert len(compared) == 3  # the unknown keys went through the same comparison


def test_api_key_last_used_and_revocation(tenants):
    acme = tenants.create("acme")
    key, record = tenants.create_api_key(acme.id)
    assert record.last_used_at is None
    tenants.authenticate(key)
    (used,) = tenants.api_keys(acme.id)
    assert used.last_used_at is not None
    tenants.revoke_api_key(record.id)
    assert tenants.authenticate(key) is None
    assert tenants.api_keys(acme.id)[0].revoked_at is not None


def test_last_used_is_written_at_most_once_per_interval(catalog):
    slow = Tenants(catalog, touch_interval_s=3600)
    acme = slow.create("acme")
    key, _ = slow.create_api_key(acme.id)
    slow.authenticate(key)
    first = slow.api_keys(acme.id)[0].last_used_at
    slow.authenticate(key)
    assert slow.api_keys(acme.id)[0].last_used_at == first


def test_adapter_lifecycle_and_events(catalog, tenants):
    acme = tenants.create("acme")
    v1 = catalog.begin_upload(acme.id, "bot")
    assert (v1.state, v1.version) == ("uploading", 1)
    with pytest.raises(AdapterNotReady, match="is uploading"):
        catalog.resolve(acme.id, "bot")
    catalog.set_validating(v1.id, 100)
    ready = {"size_bytes": 100, "rank": 8, "alpha": 16.0, "base_model": None}
    catalog.mark_ready(v1.id, sha256="a" * 64, targets=("q", "v"), **ready)
    assert catalog.resolve(acme.id, "bot").targets == ("q", "v")
    v2 = catalog.begin_upload(acme.id, "bot")
    assert v2.version == 2 and catalog.resolve(acme.id, "bot").id == v1.id
    catalog.set_validating(v2.id, 100)
    assert catalog.mark_ready(v2.id, sha256="b" * 64, targets=("q",), **ready) == [
        v1.id
    ]
    assert catalog.get(v1.id).state == "deleting"  # superseded, kept while in use
    assert catalog.resolve(acme.id, "bot").id == v2.id
    with pytest.raises(AdapterNotReady, match="cannot become ready"):
        catalog.mark_ready(v2.id, sha256="b" * 64, targets=(), **ready)
    assert catalog.mark_corrupt("b" * 64, "bytes changed") == [v2.id]
    with pytest.raises(AdapterNotReady, match="'bot' is corrupt: bytes changed"):
        catalog.resolve(acme.id, "bot")
    kinds = [e.kind for e in reversed(catalog.events())]
    assert kinds == [
        "uploaded",
        "validated",
        "uploaded",
        "validated",
        "deleted",
        "corrupt",
    ]
    assert all(e.tenant_id == acme.id for e in catalog.events())


def test_another_tenants_adapter_reads_exactly_like_a_missing_one(catalog, tenants):
    acme, other = tenants.create("acme"), tenants.create("other")
    catalog.begin_upload(acme.id, "bot")
    with pytest.raises(AdapterNotFound) as theirs:
        catalog.resolve(other.id, "bot")
    with pytest.raises(AdapterNotFound) as missing:
        catalog.resolve(acme.id, "nothing")
    assert type(theirs.value) is type(missing.value)
    assert str(theirs.value) == "adapter 'bot' not found"
    assert str(missing.value) == "adapter 'nothing' not found"
    with pytest.raises(AdapterNotFound):
        catalog.begin_delete(other.id, "bot")


def test_uploads_need_an_existing_tenant(catalog):
    with pytest.raises(TenantNotFound):
        catalog.begin_upload("no-such-tenant", "bot")


def test_failed_uploads_keep_their_reason_and_a_write_rolls_back_whole(
    catalog, tenants
):
    acme = tenants.create("acme")
    row = catalog.begin_upload(acme.id, "bot")
    catalog.mark_failed(row.id, "r must be a positive integer")
    assert catalog.get(row.id).error == "r must be a positive integer"
    with pytest.raises(sqlite3.IntegrityError), catalog.write() as db:
        db.execute("UPDATE adapters SET state = 'ready' WHERE id = ?", [row.id])
        db.execute("INSERT INTO tenants (id, name, created_at) VALUES ('x', 'acme', 0)")
    assert catalog.get(row.id).state == "failed"


def test_a_deleted_tenant_frees_its_name_and_its_keys_stop_working(tenants):
    acme = tenants.create("acme")
    key, _ = tenants.create_api_key(acme.id)
    assert tenants.authenticate(key) == acme
    tenants.delete(acme.id)
    assert tenants.authenticate(key) is None
    with pytest.raises(TenantNotFound):
        tenants.get(acme.id)
    assert [t.name for t in tenants.list()] == []
    assert tenants.create("acme").id != acme.id  # the name is free again


def test_adapter_last_used_is_written_at_most_once_per_interval(tmp_path):
    now = [1000.0]
    catalog = Catalog(tmp_path / "touch.db", clock=lambda: now[0], touch_interval_s=10)
    acme = Tenants(catalog).create("acme")
    adapter = catalog.begin_upload(acme.id, "bot")
    try:
        assert catalog.get(adapter.id).last_used_at is None
        catalog.touch(adapter.id)  # the first use is written at once
        assert catalog.get(adapter.id).last_used_at == 1000.0
        now[0] = 1009.0
        catalog.touch(adapter.id)  # within the interval: no write
        assert catalog.get(adapter.id).last_used_at == 1000.0
        now[0] = 1010.0
        catalog.touch(adapter.id)
        assert catalog.get(adapter.id).last_used_at == 1010.0
        catalog.mark_failed(adapter.id, "gone")
        catalog.remove(adapter.id)
        assert adapter.id not in catalog._touched  # removed versions are forgotten
    finally:
        catalog.close()
