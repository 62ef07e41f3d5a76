"""A real `loraplex serve` over the demo model, with two tenants and random adapters."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx
import pytest

from api.server_utils import running_server
from loraplex.loadgen import BaseShapes, upload_adapters

ADMIN = {"Authorization": "Bearer admin-key"}


@dataclass
class BenchServer:
    url: str
    keys: dict[str, str]  # tenant name → key
    server: object


def make_tenant(url: str, name: str) -> str:
    tenant = httpx.post(f"{url}/admin/api/tenants", json={"name": name}, headers=ADMIN)
    assert tenant.status_code == 201, tenant.text
    issued = httpx.post(
        f"{url}/admin/api/tenants/{tenant.json()['id']}/keys", json={}, headers=ADMIN
    )
    assert issued.status_code == 201, issued.text
    return issued.json()["key"]


@pytest.fixture(scope="module")
def bench_server(demo_assets, tmp_path_factory):
    """6 random rank-8 adapters bench-0..bench-5 for tenants acme and globex, 4 slots."""
    data = tmp_path_factory.mktemp("bench") / "data"
    with running_server(
        demo_assets.model,
        data,
        max_loras=4,
        max_lora_rank=16,
        max_model_len=256,
        served_model_name="demo-base",
    ) as (url, server):
        keys = {name: make_tenant(url, name) for name in ("acme", "globex")}
        shapes = BaseShapes.from_model_dir(demo_assets.model)
        report = asyncio.run(
            upload_adapters(url, list(keys.values()), shapes, count=6, rank=8)
        )
        assert report.uploaded == 12 and not report.failed, report
        yield BenchServer(url, keys, server)
