"""The registry's SQLite schema, as sqlite-utils migrations, and how a connection is opened.

Every connection uses WAL (readers never block the writer), synchronous=FULL (a registry writes
rarely, so it can afford to keep every commit through a power cut), foreign keys and a busy
timeout. Migrations are functions applied in order, each in its own transaction; add new ones at
the end and never edit an applied one.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlite_utils import Database, Migrations

MIGRATIONS = Migrations("loraplex.registry")
ADAPTER_STATES = ("uploading", "validating", "ready", "failed", "deleting", "corrupt")
EVENT_KINDS = (
    "uploaded",
    "validated",
    "loaded",
    "evicted",
    "pinned",
    "unpinned",
    "deleted",
    "failed",
    "corrupt",
)


@MIGRATIONS()
def m001_tenants_keys_adapters_events(db: Database) -> None:
    db.execute(
        """CREATE TABLE tenants (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE api_keys (
            id INTEGER PRIMARY KEY,
            tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
            key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            label TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            last_used_at REAL,
            revoked_at REAL
        )"""
    )
    states = ", ".join(f"'{s}'" for s in ADAPTER_STATES)
    db.execute(
        f"""CREATE TABLE adapters (
            id INTEGER PRIMARY KEY,
            tenant_id TEXT NOT NULL REFERENCES tenants(id),
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            state TEXT NOT NULL CHECK (state IN ({states})),
            base_model TEXT,
            rank INTEGER,
            alpha REAL,
            targets TEXT,
            size_bytes INTEGER,
            sha256 TEXT,
            upload_id TEXT NOT NULL UNIQUE,
            error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            last_used_at REAL,
            UNIQUE (tenant_id, name, version)
        )"""
    )
    db.execute("CREATE INDEX adapters_by_sha ON adapters(sha256)")
    db.execute("CREATE INDEX adapters_by_state ON adapters(state)")
    db.execute(
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            tenant_id TEXT,
            adapter_id INTEGER,
            detail TEXT NOT NULL DEFAULT ''
        )"""
    )
    db.execute("CREATE INDEX events_by_adapter ON events(adapter_id)")


@MIGRATIONS()
def m002_tenant_deletion(db: Database) -> None:
    # A deleted tenant keeps its row (renamed, freeing the name) until its adapters are gone.
    db.execute("ALTER TABLE tenants ADD COLUMN deleted_at REAL")


@MIGRATIONS()
def m003_adapter_ids_never_reused(db: Database) -> None:
    # An adapter id names one adapter version for good: the pool keys by it and concurrent
    # collects remove by it. Without AUTOINCREMENT SQLite gives the largest id again after
    # its row is deleted, so a collect that lost the race to another one removed (or was
    # refused on) a new upload that had taken the id (seen in the SIGKILL reliability test).
    states = ", ".join(f"'{s}'" for s in ADAPTER_STATES)
    db.execute(
        f"""CREATE TABLE adapters_m003 (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            tenant_id TEXT NOT NULL REFERENCES tenants(id),
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            state TEXT NOT NULL CHECK (state IN ({states})),
            base_model TEXT,
            rank INTEGER,
            alpha REAL,
            targets TEXT,
            size_bytes INTEGER,
            sha256 TEXT,
            upload_id TEXT NOT NULL UNIQUE,
            error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            last_used_at REAL,
            UNIQUE (tenant_id, name, version)
        )"""
    )
    db.execute("INSERT INTO adapters_m003 SELECT * FROM adapters")
    db.execute("DROP TABLE adapters")
    db.execute("ALTER TABLE adapters_m003 RENAME TO adapters")
    db.execute("CREATE INDEX adapters_by_sha ON adapters(sha256)")
    db.execute("CREATE INDEX adapters_by_state ON adapters(state)")
    # Ids of adapters removed before this migration live on in the event log: start past them
    # (one row per table in sqlite_sequence; the copy above may have written one).
    db.execute(
        "DELETE FROM sqlite_sequence WHERE name IN ('adapters', 'adapters_m003')"
    )
    db.execute(
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'adapters', "
        "MAX(COALESCE((SELECT MAX(id) FROM adapters), 0), "
        "COALESCE((SELECT MAX(adapter_id) FROM events), 0))"
    )


def connect(path: Path, busy_timeout_s: float = 5.0) -> Database:
    """Open (creating if needed) and migrate the registry database at a server-chosen path."""
    conn = sqlite3.connect(str(path), timeout=busy_timeout_s, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    db = Database(conn, execute_plugins=False)
    db.enable_wal()
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA foreign_keys = ON")
    conn.execute(
        "BEGIN IMMEDIATE"
    )  # two processes starting at once migrate one at a time
    try:
        MIGRATIONS.apply(db)
    except BaseException:
        conn.rollback()
        raise
    conn.commit()
    return db
