"""schemathesis fuzzes every route from /openapi.json: no 5xx, and every answer fits the schema."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from server_utils import running_server

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance"
)


def test_no_server_error_and_no_schema_violation(demo_assets, tmp_path):
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.fail("schemathesis is not installed (it is in the test extra)")
    with running_server(demo_assets.model, tmp_path / "data", max_lora_rank=32) as (
        url,
        _,
    ):
        admin = {"Authorization": "Bearer admin-key"}
        tenant = httpx.post(
            f"{url}/admin/api/tenants", json={"name": "fuzz"}, headers=admin
        )
        key = httpx.post(
            f"{url}/admin/api/tenants/{tenant.json()['id']}/keys",
            json={},
            headers=admin,
        ).json()["key"]
        for who in (
            "admin-key",
            key,
        ):  # admin routes with the admin key, the rest as a tenant
            result = subprocess.run(
                [
                    cli,
                    "run",
                    f"{url}/openapi.json",
                    "-H",
                    f"Authorization: Bearer {who}",
                    "--max-examples",
                    "20",
                    "--seed",
                    "7",
                    "--checks",
                    CHECKS,
                ],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            assert result.returncode == 0, result.stdout[-8000:]
