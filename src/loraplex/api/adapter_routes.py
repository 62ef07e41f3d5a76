"""Tenants' adapters: upload (multipart), list, describe, delete — scoped to the caller's tenant."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from pydantic import BaseModel

from loraplex.adapters_registry import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterNotFound,
    RegistryError,
    UploadPart,
)
from loraplex.platform import PrefixScope

from .auth import PrincipalDep, require_principal
from .errors import ApiError, registry_error
from .inference import tenant_salt
from .schemas import ErrorResponse
from .state import Principal, get_state

ERRORS = {
    s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 409, 413, 415, 422, 503)
}
router = APIRouter(
    prefix="/v1/adapters",
    tags=["adapters"],
    dependencies=[Depends(require_principal)],
    responses=ERRORS,
)


class AdapterInfo(BaseModel):
    name: str
    version: int
    state: str
    rank: int | None
    alpha: float | None
    targets: list[str]
    size_bytes: int | None
    sha256: str | None
    created_at: float
    last_used_at: float | None
    residency: str  # "gpu" (in a device slot), "host", or "disk"
    error: str | None


class AdapterList(BaseModel):
    object: str = "list"
    data: list[AdapterInfo]


def _tenant(principal: Principal) -> str:
    if principal.tenant_id is None:
        raise ApiError(
            403, "adapters belong to tenants: use a tenant's API key", code="forbidden"
        )
    return principal.tenant_id


def _residency(request: Request) -> dict[int, str]:
    pool = get_state(request).registry.pool
    where = {}
    for entry in pool.snapshot():
        where[int(entry.key)] = (
            "gpu" if entry.on_device else ("host" if entry.host_bytes else "disk")
        )
    return where


def _info(adapter, residency: dict[int, str]) -> AdapterInfo:
    return AdapterInfo(
        name=adapter.name,
        version=adapter.version,
        state=adapter.state,
        rank=adapter.rank,
        alpha=adapter.alpha,
        targets=list(adapter.targets),
        size_bytes=adapter.size_bytes,
        sha256=adapter.sha256,
        created_at=adapter.created_at,
        last_used_at=adapter.last_used_at,
        residency=residency.get(adapter.id, "disk"),
        error=adapter.error,
    )


_FORM_FIELDS = {"name", "config", "weights", "archive", "replace"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _part_name(upload: UploadFile, canonical: str) -> str:
    client_name = (upload.filename or "").lower()
    return upload.filename if client_name.endswith(_PICKLE_SUFFIXES) else canonical


def _latest_per_name(adapters) -> list:
    latest = {}
    for adapter in adapters:  # oldest first, so the newest version wins
        if adapter.state != "deleting":
            latest[adapter.name] = adapter
    return [latest[name] for name in sorted(latest)]


@router.post(
    "",
    response_model=AdapterInfo,
    status_code=201,
    # Only the fields below: anything else in the form is refused (415).
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {"schema": {"additionalProperties": False}}
            }
        }
    },
)
async def upload_adapter(
    request: Request,
    principal: PrincipalDep,
    name: Annotated[
        str,
        Form(
            min_length=1,
            max_length=63,
            description="the adapter's name, unique within the tenant",
        ),
    ],
    config: Annotated[
        UploadFile | None, File(description="adapter_config.json")
    ] = None,
    weights: Annotated[
        UploadFile | None, File(description="adapter_model.safetensors")
    ] = None,
    archive: Annotated[
        UploadFile | None, File(description=".zip or .tar.gz holding both")
    ] = None,
    replace: Annotated[
        bool, Form(description="store a new version of an existing name")
    ] = False,
):
    """Upload a PEFT LoRA adapter: `config` + `weights`, or one `archive` holding both."""
    tenant_id = _tenant(principal)
    state = get_state(request)
    try:
        parts = await _checked_parts(
            request, tenant_id, name, config, weights, archive, replace
        )
        adapter = await asyncio.to_thread(
            state.registry.registry.ingest, tenant_id, name, parts
        )
    except (ApiError, RegistryError) as exc:
        status = exc.status if isinstance(exc, ApiError) else registry_error(exc).status
        state.metrics.uploads.labels(str(status)).inc()
        raise
    state.metrics.uploads.labels("ready").inc()
    if replace:  # older versions go as soon as no running request uses them
        await _forget_cached_kv(request, principal, name)
        await asyncio.to_thread(state.registry.collect)
    return _info(adapter, _residency(request))


async def _forget_cached_kv(request: Request, principal: Principal, name: str) -> None:
    """Drop the cached KV of a name's superseded or deleted versions (before their rows
    go), so that it is reused first. Only an optimisation: a new version has a new digest,
    hence blocks of its own, and no request can reach the old ones."""
    state = get_state(request)
    tenant_id = _tenant(principal)
    versions = await asyncio.to_thread(
        state.registry.registry.catalog.list_adapters, tenant_id
    )
    live = {a.sha256 for a in versions if a.state == "ready"}
    stale = {a.sha256 for a in versions if a.name == name and a.sha256} - live
    for digest in stale:
        scope = PrefixScope(digest, tenant_salt(principal))
        state.client.forget_prefix(scope)


async def _checked_parts(
    request: Request,
    tenant_id: str,
    name: str,
    config: UploadFile | None,
    weights: UploadFile | None,
    archive: UploadFile | None,
    replace: bool,
) -> list[UploadPart]:
    """The upload's files, once the form has exactly the fields an upload has."""
    registry = get_state(request).registry.registry
    form = await request.form()
    repeated = sorted(k for k in set(form.keys()) if len(form.getlist(k)) > 1)
    if repeated:
        raise ApiError(
            415,
            f"form field {repeated[0]!r} was sent twice",
            param=repeated[0],
            code="unsupported_format",
        )
    unexpected = sorted(set(form.keys()) - _FORM_FIELDS)
    if unexpected:
        raise ApiError(
            415,
            f"unexpected form field {unexpected[0]!r}: an upload is name + config + weights, "
            "or name + archive (adapter_config.json and adapter_model.safetensors only)",
            param=unexpected[0],
            code="unsupported_format",
        )
    if archive is not None and (config is not None or weights is not None):
        raise ApiError(
            400, "send either archive, or config and weights, not both", param="archive"
        )
    if archive is None and (config is None or weights is None):
        raise ApiError(400, "send config and weights, or one archive", param="config")
    if not replace:
        existing = [
            a
            for a in registry.catalog.list_adapters(tenant_id)
            if a.name == name and a.state in ("ready", "uploading", "validating")
        ]
        if existing:
            raise ApiError(
                409,
                f"adapter {name!r} exists; send replace=true for a new version",
                param="name",
                code="adapter_exists",
            )
    if archive is not None:
        parts = [UploadPart(archive.filename or "upload", archive.file)]
    else:
        # The form field says which file is which; the client's file name only matters when
        # it reveals a pickle, so that the refusal can say how to convert.
        parts = [
            UploadPart(_part_name(upload, canonical), upload.file)
            for upload, canonical in (
                (config, ADAPTER_CONFIG),
                (weights, ADAPTER_WEIGHTS),
            )
        ]
    return parts


@router.get("", response_model=AdapterList)
async def list_adapters(request: Request, principal: PrincipalDep):
    """The caller's adapters, newest version of each name."""
    registry = get_state(request).registry.registry
    adapters = _latest_per_name(registry.catalog.list_adapters(_tenant(principal)))
    residency = _residency(request)
    return AdapterList(data=[_info(a, residency) for a in adapters])


@router.get("/{name}", response_model=AdapterInfo)
async def get_adapter(name: str, request: Request, principal: PrincipalDep):
    """One adapter: state, version, rank, targets, size, sha256, times, residency."""
    registry = get_state(request).registry.registry
    matches = _latest_per_name(
        a for a in registry.catalog.list_adapters(_tenant(principal)) if a.name == name
    )
    if not matches:
        raise AdapterNotFound(f"adapter {name!r} not found")
    return _info(matches[0], _residency(request))


@router.delete("/{name}", status_code=204)
async def delete_adapter(name: str, request: Request, principal: PrincipalDep):
    """Delete every version; files go once no running request uses them."""
    bridge = get_state(request).registry
    await asyncio.to_thread(bridge.registry.delete, _tenant(principal), name)
    await _forget_cached_kv(request, principal, name)
    await asyncio.to_thread(bridge.collect)
