"""Plain-data views of the registry and the pool, shared by the admin JSON API and the admin UI.

Each function returns dicts and lists only, so one function feeds both an HTML page and its
`.json` twin.
"""

from __future__ import annotations

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
