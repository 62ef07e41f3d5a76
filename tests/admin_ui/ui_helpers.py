"""Helpers of the admin UI tests: a real server over the demo model, and signed-in clients.

A plain module (not conftest.py) so that `from ui_helpers import ...` cannot pick up another
directory's conftest; conftest.py re-exports the fixtures.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import httpx
import pytest

# The real-server helper lives beside the API tests (tests/ is not a package).
sys.path.append(str(Path(__file__).parent.parent / "api"))

from server_utils import running_server

ADMIN_KEY = "admin-key"
PAGES = ("overview", "tenants", "adapters", "pool", "events")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "admin_ui"


@pytest.fixture(scope="module")
def ui_server(demo_assets, tmp_path_factory):
    """(base_url, Server) with two GPU slots, so the pool turns over in a short test."""
    data = tmp_path_factory.mktemp("admin_ui") / "data"
    with running_server(
        demo_assets.model,
        data,
        max_loras=2,
        max_cpu_loras=2,
        max_upload_bytes=2_000_000,
        max_lora_rank=32,
        served_model_name="demo-base",
    ) as (url, server):
        yield url, server


def sign_in(url: str, key: str = ADMIN_KEY) -> tuple[httpx.Client, str]:
    """A client holding an admin session, and the session's CSRF token."""
    client = httpx.Client(base_url=url, follow_redirects=False, timeout=30)
    form = client.get("/admin/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    signed = client.post("/admin/login", data={"key": key, "csrf_token": token})
    assert signed.status_code == 303, signed.text
    page = client.get("/admin/tenants")
    csrf = re.search(r'data-csrf="([^"]+)"', page.text).group(1)
    return client, csrf


@pytest.fixture
def admin(ui_server):
    client, csrf = sign_in(ui_server[0])
    yield client, csrf
    client.close()
