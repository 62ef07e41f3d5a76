"""Recovery: the startup sweep, `verify` and `gc` over one data directory.

After a crash the catalog and the files can disagree in only a few ways, each repaired here:
rows stuck in uploading/validating (→ failed), temp files (→ removed), stored folders no row
uses (orphans → removed), rows whose files are missing or changed (→ corrupt), and deleting
rows (→ removed: at startup no request holds them).

Data directory layout: registry.db (+ WAL), registry.lock, adapters/, tmp/.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .artifacts import ADAPTER_FILES, DIGEST, ArtifactStore
from .catalog import SERVABLE, Catalog
from .errors import RegistryBusy, RegistryError

DB_NAME = "registry.db"
LOCK_NAME = "registry.lock"
INTERRUPTED = (
    "interrupted: the server stopped while this upload was in progress; upload it again"
)


@dataclass(frozen=True)
class SweepReport:
    """What a sweep repaired."""

    failed_uploads: tuple[int, ...]  # adapter ids
    removed_temp: tuple[str, ...]  # names under tmp/
    removed_orphans: tuple[str, ...]  # names under adapters/
    corrupt: tuple[int, ...]  # adapter ids newly marked corrupt
    removed_rows: tuple[int, ...]  # deleting rows dropped

    @property
    def changed(self) -> bool:
        return any(vars(self).values())


@dataclass(frozen=True)
class VerifyReport:
    """Every stored adapter checked byte for byte against its sha256."""

    checked: int
    corrupt: tuple[tuple[int, str], ...]  # (adapter id, what is wrong), newly marked


def lock_data_dir(data_dir: Path) -> int:
    """Hold the data directory for this process; the lock goes when the process does.

    :raises RegistryBusy: another process (a running server) holds it.
    """
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(data_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RegistryBusy(
            f"another process (a running server?) holds {data_dir}; stop it first"
        ) from None
    return fd


def sweep(
    catalog: Catalog,
    store: ArtifactStore,
    *,
    full_hash: bool = False,
    finish_deletes: bool = True,
    active_uploads: frozenset[str] = frozenset(),
) -> SweepReport:
    """Bring catalog and files back in line (see the module docstring).

    :param full_hash: hash every stored adapter (slow with many); otherwise check that its
        files exist with the recorded total size. Every load re-checks the hash anyway.
    :param finish_deletes: drop deleting rows (only when no request can hold them).
    :param active_uploads: upload ids in progress in this process, left alone.
    """
    failed = []
    for adapter in catalog.list_adapters(states=("uploading", "validating")):
        if adapter.upload_id not in active_uploads:
            catalog.mark_failed(adapter.id, INTERRUPTED)
            failed.append(adapter.id)
    removed_temp = []
    for path in store.temp_entries():
        if path.name not in active_uploads:
            _remove(path)
            removed_temp.append(path.name)
    removed_rows = []
    if finish_deletes:
        for adapter in catalog.list_adapters(states=("deleting",)):
            catalog.remove(adapter.id, "removed: no request was using it")
            removed_rows.append(adapter.id)
    corrupt = []
    checked: dict[str, str | None] = {}
    for adapter in catalog.list_adapters(states=SERVABLE):
        if adapter.sha256 not in checked:
            checked[adapter.sha256] = (
                store.problem(adapter.sha256)
                if full_hash
                else _quick_problem(store, adapter.sha256, adapter.size_bytes)
            )
        problem = checked[adapter.sha256]
        if problem is not None:
            corrupt += catalog.mark_corrupt(adapter.sha256, f"stored files: {problem}")
    in_use = catalog.digests_in_use()
    orphans = []
    for name in store.stored():
        if name not in in_use:
            if DIGEST.fullmatch(name):
                store.remove(name)
            else:
                _remove(store.adapters_dir / name)
            orphans.append(name)
    return SweepReport(
        tuple(failed),
        tuple(removed_temp),
        tuple(orphans),
        tuple(corrupt),
        tuple(removed_rows),
    )


def _quick_problem(store: ArtifactStore, digest: str, size: int | None) -> str | None:
    path = store.path_of(digest)
    try:
        sizes = [(path / name).stat().st_size for name in ADAPTER_FILES]
    except OSError:
        return "its files are missing"
    if size is not None and sum(sizes) != size:
        return f"they hold {sum(sizes)} bytes, not the {size} stored"
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _existing_db(data_dir: Path) -> Path:
    path = Path(data_dir) / DB_NAME
    if not path.is_file():
        raise RegistryError(
            f"{data_dir} holds no adapter registry ({DB_NAME} is missing)"
        )
    return path


def verify(data_dir: Path) -> VerifyReport:
    """Hash every servable adapter's files; mark those that changed corrupt.

    Safe while a server runs: it only reads files and marks rows.
    :raises RegistryError: `data_dir` holds no registry.
    """
    catalog = Catalog(_existing_db(data_dir))
    try:
        store = ArtifactStore(Path(data_dir))
        corrupt = []
        digests = {a.sha256 for a in catalog.list_adapters(states=SERVABLE)}
        for digest in sorted(digests):
            problem = store.problem(digest)
            if problem is not None:
                for adapter_id in catalog.mark_corrupt(
                    digest, f"stored files: {problem}"
                ):
                    corrupt.append((adapter_id, problem))
        return VerifyReport(len(digests), tuple(corrupt))
    finally:
        catalog.close()


def gc(data_dir: Path, full_hash: bool = False) -> SweepReport:
    """The startup sweep, on demand, for a data directory no server is using.

    :raises RegistryBusy: a server holds the directory.
    """
    db_path = _existing_db(data_dir)
    fd = lock_data_dir(Path(data_dir))
    try:
        catalog = Catalog(db_path)
        try:
            return sweep(catalog, ArtifactStore(Path(data_dir)), full_hash=full_hash)
        finally:
            catalog.close()
    finally:
        os.close(fd)
