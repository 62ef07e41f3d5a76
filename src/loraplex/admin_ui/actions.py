"""What the UI changes (POST, each with a session and its CSRF token): tenants, keys, uploads
and the pool. Forms answer 303 back to their page with a one-time message; the upload, sent by
script for its progress bar, answers JSON (and falls back to a redirect without script)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from loraplex.adapters_registry import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterInvalid,
    AdapterNotFound,
    AdapterTooLarge,
    NameInvalid,
    PoolExhausted,
    RegistryError,
    TenantNotFound,
    UnsupportedFormat,
    UploadPart,
)

from .render import error_json, json_response, redirect
from .security import CsrfSessionDep, safe_back, wants_json
from .sessions import Session

router = APIRouter(tags=["admin-ui"], include_in_schema=False)
BackField = Annotated[str, Form(max_length=2048)]


def _services(request: Request):
    return request.app.state.admin_ui.state.services


def _say(session: Session, text: str, level: str = "ok", **extra: object) -> None:
    session.flashes.append({"level": level, "text": text, **extra})


async def _run(session: Session, what: str, fn, *args) -> object | None:
    """Run a registry call in a thread; a refusal becomes an error message, not a 500."""
    try:
        return await asyncio.to_thread(fn, *args)
    except RegistryError as exc:
        _say(session, f"{what}: {exc}", "error")
        return None


# -- tenants and keys -----------------------------------------------------------------------


@router.post("/admin/tenants")
async def create_tenant(
    request: Request, session: CsrfSessionDep, name: Annotated[str, Form()] = ""
) -> Response:
    tenants = _services(request).registry.tenants
    tenant = await _run(session, "Could not create the tenant", tenants.create, name)
    if tenant is not None:
        _say(session, f"Tenant {tenant.name} created. Issue it a key below.")
    return redirect("/admin/tenants")


@router.post("/admin/tenants/{tenant_id}/delete")
async def delete_tenant(
    tenant_id: str, request: Request, session: CsrfSessionDep
) -> Response:
    services = _services(request)
    done = await _run(
        session, "Could not delete the tenant", _delete_tenant, services, tenant_id
    )
    if done:
        _say(session, "Tenant deleted: its keys stopped working, its adapters go.")
    return redirect("/admin/tenants")


def _delete_tenant(services, tenant_id: str) -> bool:
    services.registry.delete_tenant(tenant_id)
    services.collect()
    return True


@router.post("/admin/tenants/{tenant_id}/keys")
async def issue_key(
    tenant_id: str,
    request: Request,
    session: CsrfSessionDep,
    label: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    """Issue a key; it is shown once, on the next page, and never stored in clear."""
    tenants = _services(request).registry.tenants
    tenant = await _run(session, "Could not issue a key", tenants.get, tenant_id)
    if tenant is not None:
        key, record = await asyncio.to_thread(tenants.create_api_key, tenant_id, label)
        _say(
            session,
            f"New key for {tenant.name}: copy it now, it is shown only once.",
            "key",
            key=key,
            key_id=record.id,
        )
    return redirect("/admin/tenants")


@router.post("/admin/keys/{key_id}/revoke")
async def revoke_key(
    key_id: int, request: Request, session: CsrfSessionDep
) -> Response:
    tenants = _services(request).registry.tenants
    await asyncio.to_thread(tenants.revoke_api_key, key_id)
    _say(session, f"Key {key_id} revoked: it stopped working.")
    return redirect("/admin/tenants")


# -- adapters -------------------------------------------------------------------------------


class AdapterExists(RegistryError):
    """An upload under a name in use, without 'replace'."""


_STATUS = (
    (AdapterExists, 409, "adapter_exists"),
    (AdapterTooLarge, 413, "adapter_too_large"),
    (UnsupportedFormat, 415, "unsupported_format"),
    (AdapterInvalid, 422, "adapter_invalid"),
    (NameInvalid, 400, "invalid_name"),
    (TenantNotFound, 404, "tenant_not_found"),
    (AdapterNotFound, 404, "model_not_found"),
    (PoolExhausted, 503, "pool_exhausted"),
)


def _file(form, field: str) -> UploadFile | None:
    value = form.get(field)
    # A file input left empty still sends a part, with no file name.
    return value if isinstance(value, UploadFile) and value.filename else None


def _parts(form) -> list[UploadPart]:
    config, weights, archive = (
        _file(form, f) for f in ("config", "weights", "archive")
    )
    if archive is not None and (config or weights):
        raise AdapterInvalid("send either an archive, or config and weights, not both")
    if archive is not None:
        return [UploadPart(archive.filename, archive.file)]
    if config is None or weights is None:
        raise AdapterInvalid(
            "choose adapter_config.json and adapter_model.safetensors, or one archive"
        )
    return [
        UploadPart(ADAPTER_CONFIG, config.file),
        UploadPart(ADAPTER_WEIGHTS, weights.file),
    ]


def _ingest(services, tenant_id: str, name: str, replace: bool, parts) -> dict:
    registry = services.registry
    registry.tenants.get(tenant_id)  # TenantNotFound before anything is stored
    if not replace and any(
        a.name == name and a.state in ("ready", "uploading", "validating")
        for a in registry.catalog.list_adapters(tenant_id)
    ):
        raise AdapterExists(
            f"adapter {name!r} exists; tick 'replace' for a new version"
        )
    adapter = registry.ingest(tenant_id, name, parts)
    if replace:  # older versions go once no running request uses them
        services.collect()
    return {"id": adapter.id, "name": adapter.name, "version": adapter.version}


@router.post("/admin/adapters/upload")
async def upload(request: Request, session: CsrfSessionDep) -> Response:
    """Store an adapter for a tenant through the registry's ingest (validated on the way)."""
    form = await request.form(max_files=3, max_fields=10)
    tenant, name = str(form.get("tenant") or ""), str(form.get("name") or "")
    replace = form.get("replace") in ("on", "true", "1")
    try:
        parts = _parts(form)
        adapter = await asyncio.to_thread(
            _ingest, _services(request), tenant, name, replace, parts
        )
    except RegistryError as exc:
        status, code = next(
            ((s, c) for cls, s, c in _STATUS if isinstance(exc, cls)), (409, "conflict")
        )
        if wants_json(request):
            return error_json(status, str(exc), code)
        _say(session, f"Upload refused: {exc}", "error")
        return redirect("/admin/adapters")
    message = f"Adapter {adapter['name']} v{adapter['version']} uploaded and validated."
    if wants_json(request):
        return json_response({**adapter, "message": message}, 201)
    _say(session, message)
    return redirect("/admin/adapters")


def _adapter(services, adapter_id: int):
    return services.registry.catalog.get(adapter_id)


def _delete(services, adapter_id: int) -> str:
    adapter = _adapter(services, adapter_id)
    services.registry.delete(adapter.tenant_id, adapter.name)
    services.collect()
    return f"Adapter {adapter.name} deleted (every version; files go once unused)."


def _pin(services, adapter_id: int) -> str:
    adapter = _adapter(services, adapter_id)
    slot = services.pool.pin(adapter_id)
    return f"Adapter {adapter.name} pinned in GPU slot {slot}."


def _unpin(services, adapter_id: int) -> str:
    adapter = _adapter(services, adapter_id)
    if not services.pool.unpin(adapter_id):
        return f"Adapter {adapter.name} was not pinned."
    return f"Adapter {adapter.name} unpinned: its slot may be reused."


def _prefetch(services, adapter_id: int, to: str) -> str:
    adapter = _adapter(services, adapter_id)
    services.pool.prefetch(adapter_id, to="host" if to == "host" else "device")
    where = "host memory" if to == "host" else "a GPU slot"
    return f"Loading adapter {adapter.name} into {where}."


def _evict(services, adapter_id: int) -> str:
    adapter = _adapter(services, adapter_id)
    if not services.pool.evict(adapter_id):
        raise AdapterNotFound(f"{adapter.name} is pinned or loading; unpin it first")
    return f"Adapter {adapter.name} evicted from GPU and host memory."


_ACTIONS = {
    "delete": _delete,
    "pin": _pin,
    "unpin": _unpin,
    "prefetch": _prefetch,
    "evict": _evict,
}


@router.post("/admin/adapters/{adapter_id}/{action}")
async def adapter_action(
    adapter_id: int,
    action: str,
    request: Request,
    session: CsrfSessionDep,
    back: BackField = "",
    to: Annotated[str, Form(max_length=10)] = "device",
) -> Response:
    """delete, pin, unpin, prefetch (to device or host) or evict one adapter."""
    target = safe_back(back, "/admin/adapters")
    fn = _ACTIONS.get(action)
    if fn is None:
        _say(session, f"Unknown action {action!r}.", "error")
        return redirect(target)
    args = (_services(request), adapter_id) + ((to,) if action == "prefetch" else ())
    message = await _run(session, f"Could not {action} adapter {adapter_id}", fn, *args)
    if message:
        _say(session, str(message))
    return redirect(target)
