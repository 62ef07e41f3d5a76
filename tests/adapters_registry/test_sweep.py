"""The startup sweep and `gc`: each way catalog and files can disagree, repaired."""

from __future__ import annotations

import pytest
from registry_files import WEIGHTS, open_registry

from loraplex.adapters_registry import RegistryBusy, RegistryError, gc, verify
from loraplex.adapters_registry.sweep import INTERRUPTED


def test_stuck_uploads_fail_and_temp_files_go(tmp_path, spec, good):
    registry = open_registry(tmp_path / "data", spec)
    tenant = registry.tenants.create("acme")
    stuck = registry.catalog.begin_upload(tenant.id, "bot")
    staging = registry.store.staging_dir(stuck.upload_id)
    staging.mkdir()
    (staging / WEIGHTS).write_bytes(good.weights[:100])
    (registry.store.tmp_dir / "0123.trash").mkdir()
    registry.close()
    registry = open_registry(tmp_path / "data", spec)
    report = registry.startup_report
    assert report.failed_uploads == (stuck.id,)
    assert sorted(report.removed_temp) == sorted([stuck.upload_id, "0123.trash"])
    assert registry.catalog.get(stuck.id).error == INTERRUPTED
    assert registry.store.temp_entries() == []
    registry.close()


def test_orphans_go_and_missing_or_resized_files_mark_rows_corrupt(
    tmp_path, spec, good, adapter_dirs
):
    registry = open_registry(tmp_path / "data", spec)
    tenant = registry.tenants.create("acme")
    kept = registry.ingest(tenant.id, "kept", good.parts())
    gone = registry.ingest(tenant.id, "gone", good.with_config(lora_alpha=4).parts())
    cut = registry.ingest(tenant.id, "cut", good.with_config(lora_alpha=2).parts())
    (registry.store.adapters_dir / ("f" * 64)).mkdir()
    (registry.store.adapters_dir / "junk.txt").write_text("?")
    registry.store.remove(gone.sha256)
    path = registry.store.path_of(cut.sha256) / WEIGHTS
    path.write_bytes(path.read_bytes()[:-4])
    registry.close()

    registry = open_registry(tmp_path / "data", spec)
    report = registry.startup_report
    assert sorted(report.removed_orphans) == ["f" * 64, "junk.txt"]
    assert sorted(report.corrupt) == sorted([gone.id, cut.id])
    assert "its files are missing" in registry.catalog.get(gone.id).error
    assert "not the" in registry.catalog.get(cut.id).error
    assert registry.catalog.get(kept.id).state == "ready"
    assert registry.store.path_of(cut.sha256).exists()  # kept for a look
    registry.close()


def test_deleting_rows_are_finished_at_startup(tmp_path, spec, good):
    registry = open_registry(tmp_path / "data", spec)
    tenant = registry.tenants.create("acme")
    adapter = registry.ingest(tenant.id, "bot", good.parts())
    registry.delete(tenant.id, "bot")
    registry.close()
    registry = open_registry(tmp_path / "data", spec)
    assert registry.startup_report.removed_rows == (adapter.id,)
    assert registry.store.stored() == [] and registry.catalog.list_adapters() == []
    registry.close()


def test_gc_refuses_a_directory_a_server_holds(tmp_path, spec, good):
    registry = open_registry(tmp_path / "data", spec)
    with pytest.raises(RegistryBusy, match="stop it first"):
        gc(tmp_path / "data")
    tenant = registry.tenants.create("acme")
    stuck = registry.catalog.begin_upload(tenant.id, "bot")
    registry.close()
    report = gc(tmp_path / "data")
    assert report.failed_uploads == (stuck.id,)
    assert not gc(tmp_path / "data").changed
    assert verify(tmp_path / "data").checked == 0


def test_verify_and_gc_need_an_existing_registry(tmp_path):
    for command in (verify, gc):
        with pytest.raises(RegistryError, match="holds no adapter registry"):
            command(tmp_path / "nothing")
    assert not (tmp_path / "nothing" / "registry.db").exists()


def test_only_one_server_opens_a_data_directory(tmp_path, spec):
    registry = open_registry(tmp_path / "data", spec)
    with pytest.raises(RegistryBusy):
        open_registry(tmp_path / "data", spec)
    registry.close()
    open_registry(tmp_path / "data", spec).close()
