"""The admin JSON API (admin key): tenants and keys, every adapter, the pool, the engine, events.

The admin UI renders these same functions' results; a new key is shown once, at creation.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field

from loraplex.adapters_registry import AdapterNotFound, views

from .auth import require_admin
from .errors import ApiError
from .schemas import ErrorResponse
from .state import get_state

# SQLite integers are 64-bit: larger ids cannot exist, and would not fit a query.
RowId = Annotated[int, Path(ge=1, le=2**63 - 1, description="a row id")]
ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 409, 503)}
router = APIRouter(
    prefix="/admin/api",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=ERRORS,
)


class NewTenant(BaseModel):
    name: str = Field(description="1-63 letters, digits, '-' or '_'")


class NewKey(BaseModel):
    label: str = Field(default="", max_length=100)


class Action(BaseModel):
    to: str = Field(default="device", description="prefetch target: 'device' or 'host'")


def _services(request: Request):
    services = get_state(request).registry
    if services is None:
        raise ApiError(503, "this server runs without a registry")
    return services


@router.post("/tenants", status_code=201)
async def create_tenant(body: NewTenant, request: Request) -> dict:
    """Create a tenant (it has no key yet: issue one)."""
    tenants = _services(request).registry.tenants
    return views.tenant_dict(
        await asyncio.to_thread(tenants.create, body.name), keys=[]
    )


@router.get("/tenants")
async def list_tenants(request: Request) -> dict:
    """Every tenant with its keys (records only)."""
    tenants = _services(request).registry.tenants
    return {
        "data": [views.tenant_dict(t, tenants.api_keys(t.id)) for t in tenants.list()]
    }


@router.delete("/tenants/{tenant_id}", status_code=204)
async def delete_tenant(tenant_id: str, request: Request) -> None:
    """Delete a tenant: its keys stop working and its adapters are deleted."""
    services = _services(request)
    await asyncio.to_thread(services.registry.delete_tenant, tenant_id)
    await asyncio.to_thread(services.collect)


@router.post("/tenants/{tenant_id}/keys", status_code=201)
async def issue_key(tenant_id: str, body: NewKey, request: Request) -> dict:
    """Issue an API key for a tenant; the key is in this response and never again."""
    tenants = _services(request).registry.tenants
    tenants.get(tenant_id)  # 404 for an unknown tenant
    key, record = await asyncio.to_thread(tenants.create_api_key, tenant_id, body.label)
    return {**views.key_dict(record), "key": key}


@router.delete("/keys/{key_id}", status_code=204)
async def revoke_key(key_id: RowId, request: Request) -> None:
    """Revoke a key: it stops working at once."""
    registry = _services(request).registry
    if not registry.catalog.query("SELECT id FROM api_keys WHERE id = ?", [key_id]):
        raise ApiError(404, f"key {key_id} not found", code="key_not_found")
    await asyncio.to_thread(registry.tenants.revoke_api_key, key_id)


@router.get("/adapters")
async def list_all_adapters(
    request: Request,
    tenant: Annotated[str | None, Query(description="only this tenant id")] = None,
    state: Annotated[str | None, Query(description="only this state")] = None,
    q: Annotated[str | None, Query(description="name contains")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict:
    """Adapters of every tenant, filtered server-side and paginated."""
    rows = views.adapter_rows(_services(request), tenant, state, q)
    return {"total": len(rows), "offset": offset, "data": rows[offset : offset + limit]}


def _adapter_id(services, adapter_id: int) -> int:
    try:
        services.registry.catalog.get(adapter_id)
    except AdapterNotFound:
        raise ApiError(
            404, f"adapter id {adapter_id} not found", code="model_not_found"
        ) from None
    return adapter_id


@router.post("/adapters/{adapter_id}/pin")
async def pin_adapter(adapter_id: RowId, request: Request) -> dict:
    """Keep the adapter in a device slot until unpinned."""
    services = _services(request)
    slot = await asyncio.to_thread(services.pool.pin, _adapter_id(services, adapter_id))
    return {"id": adapter_id, "slot": slot, "pinned": True}


@router.post("/adapters/{adapter_id}/unpin")
async def unpin_adapter(adapter_id: RowId, request: Request) -> dict:
    services = _services(request)
    return {
        "id": adapter_id,
        "unpinned": services.pool.unpin(_adapter_id(services, adapter_id)),
    }


@router.post("/adapters/{adapter_id}/prefetch", status_code=202)
async def prefetch_adapter(adapter_id: RowId, body: Action, request: Request) -> dict:
    """Start loading the adapter into the host tier or a device slot."""
    if body.to not in ("device", "host"):
        raise ApiError(400, "prefetch to 'device' or 'host'", param="to")
    services = _services(request)
    services.pool.prefetch(_adapter_id(services, adapter_id), to=body.to)
    return {"id": adapter_id, "prefetching": body.to}


@router.post("/adapters/{adapter_id}/evict")
async def evict_adapter(adapter_id: RowId, request: Request) -> dict:
    """Drop the adapter from host and device now (refused while pinned or loading)."""
    services = _services(request)
    evicted = services.pool.evict(_adapter_id(services, adapter_id))
    if not evicted:
        raise ApiError(409, "the adapter is pinned or loading", code="adapter_busy")
    return {"id": adapter_id, "evicted": True}


@router.get("/pool")
async def pool_state(request: Request) -> dict:
    """The device slots and host tier, most recently used last."""
    return views.pool_view(_services(request))


@router.get("/engine")
async def engine_state(request: Request) -> dict:
    """The engine's load and the base model."""
    state = get_state(request)
    stats = state.client.stats()
    return {
        "model": state.config.served_model_name,
        "alive": state.client.alive,
        "uptime_s": time.time() - state.started_at,
        "num_running": stats.num_running,
        "num_waiting": stats.num_waiting,
        "kv_blocks_free": stats.num_free_kv_blocks,
        "kv_blocks": stats.num_kv_blocks,
        "num_preemptions": stats.num_preemptions,
    }


@router.get("/events")
async def events(
    request: Request,
    adapter: Annotated[
        int | None, Query(ge=1, le=2**63 - 1, description="only this adapter id")
    ] = None,
    tenant: Annotated[str | None, Query(description="only this tenant id")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict:
    """The registry's event log, newest first."""
    catalog = _services(request).registry.catalog
    rows = catalog.events(adapter, limit if tenant is None else 1000)
    if tenant is not None:
        rows = [e for e in rows if e.tenant_id == tenant][:limit]
    return {"data": [e.__dict__ for e in rows]}
