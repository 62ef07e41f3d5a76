"""Plain-data views of the registry and the pool, shared by the admin JSON API and the admin UI.

Each function returns dicts and lists only, so one function feeds both an HTML page and its
`.json` twin.
"""

from __future__ import annotations

import json

from .records import ApiKey, Tenant
from .services import RegistryServices


def tenant_dict(tenant: Tenant, keys: list[ApiKey] | None = None) -> dict:
    out = {"id": tenant.id, "name": tenant.name, "created_at": tenant.created_at}
    if keys is not None:
        out["keys"] = [key_dict(k) for k in keys]
    return out


def key_dict(key: ApiKey) -> dict:
    """A key's record: never the key itself, which is shown once at creation."""
    return {
        "id": key.id,
        "tenant_id": key.tenant_id,
        "prefix": key.prefix,
        "label": key.label,
        "created_at": key.created_at,
        "last_used_at": key.last_used_at,
        "revoked_at": key.revoked_at,
    }


def residency(services: RegistryServices) -> dict[int, dict]:
    """Adapter id → where it lives now (gpu, host; disk when the pool does not hold it)."""
    out = {}
    for entry in services.pool.snapshot():
        where = "gpu" if entry.on_device else ("host" if entry.host_bytes else "disk")
        out[int(entry.key)] = {
            "where": where,
            "slot": entry.slot,
            "pinned": entry.admin_pinned,
        }
    return out


def adapter_rows(
    services: RegistryServices, tenant: str | None, state: str | None, q: str | None
) -> list[dict]:
    """Every adapter version, newest first, with where it lives now (shared with the UI)."""
    where = residency(services)
    rows = []
    for a in reversed(services.registry.catalog.list_adapters(tenant)):
        if (state and a.state != state) or (q and q.lower() not in a.name.lower()):
            continue
        place = where.get(a.id, {"where": "disk", "slot": None, "pinned": False})
        rows.append(
            {
                "id": a.id,
                "tenant_id": a.tenant_id,
                "name": a.name,
                "version": a.version,
                "state": a.state,
                "rank": a.rank,
                "alpha": a.alpha,
                "targets": list(a.targets),
                "size_bytes": a.size_bytes,
                "sha256": a.sha256,
                "created_at": a.created_at,
                "last_used_at": a.last_used_at,
                "error": a.error,
                **place,
            }
        )
    return rows


def pool_view(services: RegistryServices) -> dict:
    """The device slots and host tier, least recently used first."""
    config = services.pool.config
    entries = [
        {
            "id": int(e.key),
            "slot": e.slot,
            "on_device": e.on_device,
            "loading": e.loading,
            "host_bytes": e.host_bytes,
            "pins": e.pins,
            "pinned": e.admin_pinned,
        }
        for e in services.pool.snapshot()
    ]
    return {
        "max_loras": config.max_loras,
        "max_cpu_loras": config.max_cpu_loras,
        "entries": entries,
    }


# -- the admin UI's pages: filtered, sorted and paginated in SQL ------------------------------

ADAPTER_SORTS = {
    "created": "a.created_at",
    "name": "a.name",
    "tenant": "t.name",
    "version": "a.version",
    "state": "a.state",
    "rank": "a.rank",
    "size": "a.size_bytes",
    "last_used": "a.last_used_at",
}
WHERE_CHOICES = ("gpu", "host", "disk")


def _placed(services: RegistryServices) -> tuple[dict[int, dict], dict[str, set[int]]]:
    where = residency(services)
    groups: dict[str, set[int]] = {w: set() for w in WHERE_CHOICES}
    for adapter_id, place in where.items():
        groups[place["where"]].add(adapter_id)
    groups["pinned"] = {i for i, p in where.items() if p["pinned"]}
    return where, groups


def _id_filter(ids: set[int], negate: bool = False) -> tuple[str, list[int]]:
    if not ids:
        return ("1" if negate else "0"), []
    marks = ", ".join("?" * len(ids))
    return f"a.id {'NOT IN' if negate else 'IN'} ({marks})", sorted(ids)


def adapter_page(
    services: RegistryServices,
    *,
    tenant: str | None = None,
    state: str | None = None,
    q: str | None = None,
    where: str | None = None,
    pinned: bool | None = None,
    sort: str = "created",
    descending: bool = True,
    offset: int = 0,
    limit: int = 50,
) -> dict:
    """One page of every tenant's adapter versions, filtered and sorted by the database.

    `where` is gpu, host or disk (now); `sort` a key of ADAPTER_SORTS (else by creation).
    """
    placed, groups = _placed(services)
    clauses, params = ["1"], []
    if tenant:
        clauses.append("a.tenant_id = ?")
        params.append(tenant)
    if state:
        clauses.append("a.state = ?")
        params.append(state)
    if q:
        clauses.append("instr(lower(a.name), lower(?)) > 0")  # no LIKE wildcards
        params.append(q)
    if where in ("gpu", "host"):
        clause, ids = _id_filter(groups[where])
        clauses.append(clause)
        params.extend(ids)
    elif where == "disk":
        clause, ids = _id_filter(groups["gpu"] | groups["host"], negate=True)
        clauses.append(clause)
        params.extend(ids)
    if pinned is not None:
        clause, ids = _id_filter(groups["pinned"], negate=not pinned)
        clauses.append(clause)
        params.extend(ids)
    column = ADAPTER_SORTS.get(sort, ADAPTER_SORTS["created"])
    order = "DESC" if descending else "ASC"
    body = (
        "FROM adapters a LEFT JOIN tenants t ON t.id = a.tenant_id "
        f"WHERE {' AND '.join(clauses)}"
    )
    catalog = services.registry.catalog
    total = catalog.query(f"SELECT COUNT(*) AS n {body}", params)[0]["n"]
    rows = catalog.query(
        f"SELECT a.*, t.name AS tenant_name {body} "
        f"ORDER BY {column} {order} NULLS LAST, a.id {order} LIMIT ? OFFSET ?",
        [*params, limit, offset],
    )
    out = []
    for row in rows:
        place = placed.get(row["id"], {"where": "disk", "slot": None, "pinned": False})
        out.append(
            {
                **{k: row[k] for k in _ADAPTER_FIELDS},
                "targets": json.loads(row["targets"] or "[]"),
                "tenant_name": row["tenant_name"],
                **place,
            }
        )
    return {"total": total, "offset": offset, "limit": limit, "data": out}


_ADAPTER_FIELDS = (
    "id",
    "tenant_id",
    "name",
    "version",
    "state",
    "rank",
    "alpha",
    "size_bytes",
    "sha256",
    "created_at",
    "last_used_at",
    "error",
)


def tenant_usage(services: RegistryServices) -> dict[str, dict]:
    """Tenant id → adapters (servable names), bytes (their stored size) and errors (failed
    uploads and adapters found corrupt, from the event log)."""
    catalog = services.registry.catalog
    usage: dict[str, dict] = {}
    for row in catalog.query(
        "SELECT tenant_id, COUNT(DISTINCT name) AS adapters, "
        "COALESCE(SUM(size_bytes), 0) AS bytes FROM adapters "
        "WHERE state = 'ready' GROUP BY tenant_id"
    ):
        usage[row["tenant_id"]] = {"adapters": row["adapters"], "bytes": row["bytes"]}
    for row in catalog.query(
        "SELECT tenant_id, COUNT(*) AS n FROM events "
        "WHERE kind IN ('failed', 'corrupt') GROUP BY tenant_id"
    ):
        usage.setdefault(row["tenant_id"], {})["errors"] = row["n"]
    return usage


def events_page(
    services: RegistryServices,
    *,
    tenant: str | None = None,
    adapter: str | None = None,
    kind: str | None = None,
    before: int | None = None,
    limit: int = 100,
) -> list[dict]:
    """The event log, newest first, with tenant and adapter names where they still exist.

    `adapter` is an adapter id or a name (every version of it); `before` an event id (paging).
    """
    clauses, params = ["1"], []
    if tenant:
        clauses.append("e.tenant_id = ?")
        params.append(tenant)
    if adapter:
        if adapter.isdigit():
            clauses.append("e.adapter_id = ?")
            params.append(int(adapter))
        else:
            clauses.append("e.adapter_id IN (SELECT id FROM adapters WHERE name = ?)")
            params.append(adapter)
    if kind:
        clauses.append("e.kind = ?")
        params.append(kind)
    if before is not None:
        clauses.append("e.id < ?")
        params.append(before)
    return services.registry.catalog.query(
        "SELECT e.*, a.name AS adapter_name, a.version AS adapter_version, "
        "t.name AS tenant_name FROM events e "
        "LEFT JOIN adapters a ON a.id = e.adapter_id "
        "LEFT JOIN tenants t ON t.id = e.tenant_id "
        f"WHERE {' AND '.join(clauses)} ORDER BY e.id DESC LIMIT ?",
        [*params, limit],
    )


def _names(services: RegistryServices, ids: list[int]) -> dict[int, dict]:
    if not ids:
        return {}
    rows = services.registry.catalog.query(
        "SELECT a.id, a.name, a.version, a.tenant_id, t.name AS tenant_name "
        "FROM adapters a LEFT JOIN tenants t ON t.id = a.tenant_id "
        f"WHERE a.id IN ({', '.join('?' * len(ids))})",
        ids,
    )
    return {r["id"]: r for r in rows}


def slot_grid(services: RegistryServices) -> dict:
    """Every device slot (adapter, pins, LRU rank, since when) and the host tier, LRU first.

    `lru_rank` 0 is the next slot to be reused; `in_use` counts running requests.
    """
    pool = services.pool
    entries = pool.snapshot()
    host_keys = list(map(int, pool.host.keys()))  # LRU first
    ids = sorted({int(e.key) for e in entries} | set(host_keys))
    names = _names(services, ids)
    loaded_at = {}
    if ids:
        for row in services.registry.catalog.query(
            "SELECT adapter_id, MAX(at) AS at FROM events WHERE kind = 'loaded' "
            f"AND adapter_id IN ({', '.join('?' * len(ids))}) GROUP BY adapter_id",
            ids,
        ):
            loaded_at[row["adapter_id"]] = row["at"]
    slots: list[dict] = [
        {"slot": s, "adapter_id": None} for s in range(pool.config.max_loras)
    ]
    device = [e for e in entries if e.on_device]  # the snapshot lists them LRU first
    rank = {e.key: i for i, e in enumerate(device)}
    for e in entries:
        if e.slot is None:
            continue
        adapter_id = int(e.key)
        slots[e.slot] = {
            "slot": e.slot,
            "adapter_id": adapter_id,
            **_label(names, adapter_id),
            "pinned": e.admin_pinned,
            "in_use": e.pins - int(e.admin_pinned),
            "loading": e.loading,
            "lru_rank": rank.get(e.key),
            "resident_since": loaded_at.get(adapter_id) if e.on_device else None,
        }
    host = [
        {"adapter_id": k, **_label(names, k), "bytes": pool.host.bytes_of(k)}
        for k in host_keys
    ]
    return {
        "max_loras": pool.config.max_loras,
        "max_cpu_loras": pool.config.max_cpu_loras,
        "max_cpu_bytes": pool.config.max_cpu_bytes,
        "slots": slots,
        "host": host,
        "host_bytes": sum(h["bytes"] for h in host),
    }


def _label(names: dict[int, dict], adapter_id: int) -> dict:
    row = names.get(adapter_id, {})
    return {
        "name": row.get("name"),
        "version": row.get("version"),
        "tenant_name": row.get("tenant_name"),
    }


def pool_activity(
    services: RegistryServices, since: float, bucket_s: float
) -> list[dict]:
    """Loads and evictions (device, host) per time bucket since `since`, from the event log.

    Only the newest 50,000 events are read, so a long-running server's page stays fast.
    """
    rows = services.registry.catalog.query(
        "SELECT CAST((at - ?) / ? AS INTEGER) AS bucket, "
        "CASE WHEN kind = 'loaded' THEN 'loads' "
        "WHEN detail LIKE 'from host%' THEN 'host_evictions' "
        "ELSE 'device_evictions' END AS what, COUNT(*) AS n FROM events "
        "WHERE id > (SELECT COALESCE(MAX(id), 0) FROM events) - 50000 "
        "AND at >= ? AND kind IN ('loaded', 'evicted') GROUP BY bucket, what",
        [since, bucket_s, since],
    )
    return rows
