"""Tenants and their API keys, stored in the catalog's database.

A key is `lpx-` + 43 URL-safe characters (256 random bits), shown once when it is created. Only
its SHA-256 is stored; a presented key is hashed, looked up by hash, and the digests compared
with hmac.compare_digest, so neither the lookup nor the comparison depends on the secret's
characters. Unknown, wrong and revoked keys all give the same answer: None.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import uuid

from .catalog import Catalog
from .errors import TenantExists, TenantNotFound
from .records import ApiKey, Tenant, check_name

KEY_PREFIX = "lpx-"
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


def hash_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


_COLUMNS = "id, name, created_at"


class Tenants:
    """Create, find and authenticate tenants."""

    def __init__(self, catalog: Catalog, touch_interval_s: float = 60.0) -> None:
        self.catalog = catalog
        self.touch_interval_s = (
            touch_interval_s  # last_used_at is written at most this often
        )

    def create(self, name: str) -> Tenant:
        """:raises NameInvalid, TenantExists:"""
        check_name("tenant", name)
        tenant = Tenant(uuid.uuid4().hex, name, self.catalog.clock())
        try:
            with self.catalog.write() as db:
                db["tenants"].insert(vars(tenant))
        except sqlite3.IntegrityError:
            raise TenantExists(f"tenant {name!r} exists already") from None
        return tenant

    def get(self, tenant_id: str) -> Tenant:
        """:raises TenantNotFound:"""
        rows = self.catalog.query(
            f"SELECT {_COLUMNS} FROM tenants WHERE id = ? AND deleted_at IS NULL",
            [tenant_id],
        )
        if not rows:
            raise TenantNotFound(f"tenant {tenant_id!r} does not exist")
        return Tenant(**rows[0])

    def by_name(self, name: str) -> Tenant:
        """:raises TenantNotFound:"""
        rows = self.catalog.query(
            f"SELECT {_COLUMNS} FROM tenants WHERE name = ? AND deleted_at IS NULL",
            [name],
        )
        if not rows:
            raise TenantNotFound(f"tenant {name!r} does not exist")
        return Tenant(**rows[0])

    def list(self) -> list[Tenant]:
        """Every tenant, oldest first."""
        rows = self.catalog.query(
            f"SELECT {_COLUMNS} FROM tenants WHERE deleted_at IS NULL ORDER BY created_at, id"
        )
        return [Tenant(**r) for r in rows]

    def delete(self, tenant_id: str) -> Tenant:
        """Mark a tenant deleted: its keys stop working and its name is free again at once.

        The row goes with its last adapter (AdapterRegistry.collect).
        :raises TenantNotFound:
        """
        tenant = self.get(tenant_id)
        now = self.catalog.clock()
        with self.catalog.write() as db:
            db.execute(
                "UPDATE tenants SET deleted_at = ?, name = ? WHERE id = ?",
                [now, f"{tenant.name}~deleted~{tenant.id}", tenant.id],
            )
            db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE tenant_id = ? AND revoked_at IS NULL",
                [now, tenant.id],
            )
        return tenant

    def create_api_key(self, tenant_id: str, label: str = "") -> tuple[str, ApiKey]:
        """A new key for a tenant: (the key, to show once; its record).

        :raises TenantNotFound:
        """
        self.get(tenant_id)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        row = {
            "tenant_id": tenant_id,
            "key_hash": hash_key(key),
            "prefix": key[:10],
            "label": label,
            "created_at": self.catalog.clock(),
        }
        with self.catalog.write() as db:
            key_id = db["api_keys"].insert(row).last_pk
        return key, self._key(key_id)

    def authenticate(self, key: str) -> Tenant | None:
        """The tenant a presented key belongs to, or None (unknown, wrong or revoked)."""
        digest = hash_key(key) if isinstance(key, str) else _DUMMY_HASH
        rows = self.catalog.query(
            "SELECT id, tenant_id, key_hash, last_used_at FROM api_keys "
            "WHERE key_hash = ? AND revoked_at IS NULL",
            [digest],
        )
        stored = rows[0]["key_hash"] if rows else _DUMMY_HASH
        if not hmac.compare_digest(stored, digest) or not rows:
            return None
        now = self.catalog.clock()
        last = rows[0]["last_used_at"]
        if last is None or now - last >= self.touch_interval_s:
            with self.catalog.write() as db:
                db.execute(
                    "UPDATE api_keys SET last_used_at = ? WHERE id = ?",
                    [now, rows[0]["id"]],
                )
        return self.get(rows[0]["tenant_id"])

    def revoke_api_key(self, key_id: int) -> None:
        """The key stops working at once."""
        with self.catalog.write() as db:
            db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                [self.catalog.clock(), key_id],
            )

    def api_keys(self, tenant_id: str) -> list[ApiKey]:
        """A tenant's keys (records only: the keys themselves are never stored)."""
        rows = self.catalog.query(
            "SELECT id FROM api_keys WHERE tenant_id = ? ORDER BY id", [tenant_id]
        )
        return [self._key(r["id"]) for r in rows]

    def _key(self, key_id: int) -> ApiKey:
        (row,) = self.catalog.query(
            "SELECT id, tenant_id, prefix, label, created_at, last_used_at, revoked_at "
            "FROM api_keys WHERE id = ?",
            [key_id],
        )
        return ApiKey(**row)
