"""Catalog: typed access to the registry's SQLite database (adapters and the event log).

Every write is one `BEGIN IMMEDIATE` transaction (a deferred one could fail with SQLITE_BUSY
when it upgrades to a write), serialised within the process by a lock so one connection can be
shared by the API's threads and the pool's workers. Tenants and API keys: see tenants.py.

Adapter lifecycle: uploading → validating → ready, or → failed; ready → deleting (deleted by the
owner, or superseded by a newer version, and removed once nothing uses it); ready or deleting →
corrupt when the stored files no longer match their sha256.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from .errors import AdapterNotFound, AdapterNotReady, TenantNotFound
from .migrations import EVENT_KINDS, connect
from .records import Adapter, Event, check_name

SERVABLE = (
    "ready",
    "deleting",
)  # deleting: still served to requests already holding it


class Catalog:
    """The registry database. Safe to share between threads of one process."""

    def __init__(
        self,
        path: Path,
        busy_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        touch_interval_s: float = 10.0,
    ) -> None:
        self.path = path
        self.db: Database = connect(path, busy_timeout_s)
        self.clock = clock
        self.lock = threading.RLock()
        self.touch_interval_s = (
            touch_interval_s  # adapters' last_used_at, at most this often
        )
        self._touched: dict[int, float] = {}  # adapter id -> last_used_at last written

    def close(self) -> None:
        """Checkpoint the WAL and close the connection."""
        with self.lock:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.db.conn.close()

    @contextmanager
    def write(self) -> Iterator[Database]:
        """One write transaction (BEGIN IMMEDIATE), committed on success; nests."""
        with self.lock:
            conn = self.db.conn
            if conn.in_transaction:  # nested: part of this thread's outer transaction
                yield self.db
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    def query(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[dict]:
        """Rows of a read query, as dicts."""
        with self.lock:
            return list(self.db.query(sql, params))

    # -- adapters ---------------------------------------------------------------------------

    def begin_upload(self, tenant_id: str, name: str) -> Adapter:
        """A new version of `name` in state uploading (its upload_id names its temp dir).

        :raises NameInvalid, TenantNotFound:
        """
        check_name("adapter", name)
        now = self.clock()
        with self.write() as db:
            if not db.execute(
                "SELECT 1 FROM tenants WHERE id = ? AND deleted_at IS NULL", [tenant_id]
            ).fetchone():
                raise TenantNotFound(f"tenant {tenant_id!r} does not exist")
            (version,) = db.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM adapters "
                "WHERE tenant_id = ? AND name = ?",
                [tenant_id, name],
            ).fetchone()
            row = {
                "tenant_id": tenant_id,
                "name": name,
                "version": version,
                "state": "uploading",
                "upload_id": uuid.uuid4().hex,
                "created_at": now,
                "updated_at": now,
            }
            adapter_id = db["adapters"].insert(row).last_pk
        return self.get(adapter_id)

    def set_validating(self, adapter_id: int, size_bytes: int) -> None:
        """The upload's bytes are all on disk; validation starts."""
        with self.write():
            self._transition(
                adapter_id, ("uploading",), "validating", size_bytes=size_bytes
            )
            self.log_event("uploaded", adapter_id, f"{size_bytes} bytes received")

    def mark_ready(
        self,
        adapter_id: int,
        *,
        sha256: str,
        size_bytes: int,
        rank: int,
        alpha: float,
        targets: tuple[str, ...],
        base_model: str | None,
    ) -> list[int]:
        """Validated and stored: servable from now on. Older ready versions become deleting.

        :returns: the ids of the versions this one supersedes.
        """
        with self.write() as db:
            adapter = self._transition(
                adapter_id,
                ("validating",),
                "ready",
                sha256=sha256,
                size_bytes=size_bytes,
                rank=rank,
                alpha=alpha,
                targets=json.dumps(list(targets)),
                base_model=base_model,
            )
            older = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM adapters WHERE tenant_id = ? AND name = ? "
                    "AND version < ? AND state = 'ready'",
                    [adapter.tenant_id, adapter.name, adapter.version],
                ).fetchall()
            ]
            for old in older:
                self._transition(old, ("ready",), "deleting")
            self.log_event("validated", adapter_id, f"sha256 {sha256}")
            for old in older:
                self.log_event(
                    "deleted", old, f"superseded by version {adapter.version}"
                )
        return older

    def mark_failed(self, adapter_id: int, error: str) -> None:
        """An upload that will never be ready, with the reason shown to its owner."""
        with self.write():
            self._transition(
                adapter_id, ("uploading", "validating"), "failed", error=error
            )
            self.log_event("failed", adapter_id, error)

    def mark_corrupt(self, sha256: str, detail: str) -> list[int]:
        """Every servable row whose files have this digest is corrupt; returns their ids."""
        with self.write() as db:
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM adapters WHERE sha256 = ? AND state IN (?, ?)",
                    [sha256, *SERVABLE],
                ).fetchall()
            ]
            for adapter_id in ids:
                self._transition(adapter_id, SERVABLE, "corrupt", error=detail)
                self.log_event("corrupt", adapter_id, detail)
        return ids

    def begin_delete(self, tenant_id: str, name: str) -> list[Adapter]:
        """Mark every finished version of a tenant's adapter deleting (the owner deleted it).

        :raises AdapterNotFound: the tenant has no adapter of that name.
        """
        with self.write() as db:
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM adapters WHERE tenant_id = ? AND name = ? "
                    "AND state IN ('ready', 'failed', 'corrupt', 'deleting')",
                    [tenant_id, name],
                ).fetchall()
            ]
            if not ids:
                raise AdapterNotFound(f"adapter {name!r} not found")
            for adapter_id in ids:
                self._transition(
                    adapter_id, ("ready", "failed", "corrupt", "deleting"), "deleting"
                )
            # Read inside the transaction: once it commits, a collect may remove the rows.
            return [self.get(i) for i in ids]

    def remove(self, adapter_id: int, detail: str = "removed") -> None:
        """Drop a deleting or failed row for good (its files go when no row uses them)."""
        with self.write() as db:
            adapter = self.get(adapter_id)
            if adapter.state not in ("deleting", "failed"):
                raise AdapterNotReady(
                    f"adapter {adapter.name!r} is {adapter.state}, not deleting"
                )
            db.execute("DELETE FROM adapters WHERE id = ?", [adapter_id])
            self.log_event("deleted", adapter_id, detail, adapter.tenant_id)
            self._touched.pop(
                adapter_id, None
            )  # churned versions leave no entry behind

    def touch(self, adapter_id: int) -> None:
        """Record that a request used the adapter now, at most once every
        `touch_interval_s` per adapter: a commit (with its fsync) per request held the
        catalog's one lock, behind which every request's key and adapter lookups wait."""
        now = self.clock()
        with self.lock:
            if now - self._touched.get(adapter_id, -math.inf) < self.touch_interval_s:
                return
            self._touched[adapter_id] = now
        with self.write() as db:
            db.execute(
                "UPDATE adapters SET last_used_at = ? WHERE id = ?",
                [now, adapter_id],
            )

    def get(self, adapter_id: int) -> Adapter:
        """:raises AdapterNotFound:"""
        rows = self.query("SELECT * FROM adapters WHERE id = ?", [adapter_id])
        if not rows:
            raise AdapterNotFound(f"adapter id {adapter_id} not found")
        return Adapter.from_row(rows[0])

    def resolve(self, tenant_id: str, name: str) -> Adapter:
        """The newest ready version of a tenant's adapter.

        :raises AdapterNotFound: no such name for this tenant (another tenant's reads the same).
        :raises AdapterNotReady: it exists but no version is ready; the message says why.
        """
        rows = self.query(
            "SELECT * FROM adapters WHERE tenant_id = ? AND name = ? "
            "ORDER BY state = 'ready' DESC, version DESC LIMIT 1",
            [tenant_id, name],
        )
        if not rows:
            raise AdapterNotFound(f"adapter {name!r} not found")
        adapter = Adapter.from_row(rows[0])
        if adapter.state != "ready":
            why = f": {adapter.error}" if adapter.error else ""
            raise AdapterNotReady(f"adapter {name!r} is {adapter.state}{why}")
        return adapter

    def list_adapters(
        self, tenant_id: str | None = None, states: tuple[str, ...] | None = None
    ) -> list[Adapter]:
        """Adapters, oldest first, optionally of one tenant and in some states."""
        where, params = ["1"], []
        if tenant_id is not None:
            where.append("tenant_id = ?")
            params.append(tenant_id)
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(states)
        rows = self.query(
            f"SELECT * FROM adapters WHERE {' AND '.join(where)} ORDER BY id", params
        )
        return [Adapter.from_row(r) for r in rows]

    def digests_in_use(self) -> set[str]:
        """sha256 of every row whose files must stay on disk."""
        rows = self.query(
            "SELECT DISTINCT sha256 FROM adapters WHERE sha256 IS NOT NULL "
            "AND state IN ('ready', 'deleting', 'corrupt', 'validating')"
        )
        return {r["sha256"] for r in rows}

    def _transition(
        self, adapter_id: int, from_states: tuple[str, ...], to: str, **fields: Any
    ) -> Adapter:
        adapter = self.get(adapter_id)
        if adapter.state not in from_states:
            raise AdapterNotReady(
                f"adapter {adapter.name!r} version {adapter.version} is {adapter.state}, "
                f"cannot become {to}"
            )
        with self.write() as db:
            db["adapters"].update(
                adapter_id, {"state": to, "updated_at": self.clock(), **fields}
            )
        return adapter

    # -- events -------------------------------------------------------------------------------

    def log_event(
        self,
        kind: str,
        adapter_id: int | None = None,
        detail: str = "",
        tenant_id: str | None = None,
    ) -> None:
        """Append to the event log (kind one of migrations.EVENT_KINDS)."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        with self.write() as db:
            if tenant_id is None and adapter_id is not None:
                row = db.execute(
                    "SELECT tenant_id FROM adapters WHERE id = ?", [adapter_id]
                ).fetchone()
                tenant_id = row[0] if row else None
            db["events"].insert(
                {
                    "at": self.clock(),
                    "kind": kind,
                    "tenant_id": tenant_id,
                    "adapter_id": adapter_id,
                    "detail": detail,
                }
            )

    def events(self, adapter_id: int | None = None, limit: int = 100) -> list[Event]:
        """The newest events first, optionally of one adapter."""
        if adapter_id is None:
            rows = self.query("SELECT * FROM events ORDER BY id DESC LIMIT ?", [limit])
        else:
            rows = self.query(
                "SELECT * FROM events WHERE adapter_id = ? ORDER BY id DESC LIMIT ?",
                [adapter_id, limit],
            )
        return [Event(**r) for r in rows]
