"""What the in-process reliability tests share: tenants with the demo adapters, and the
server's in-flight state read from inside and from /metrics."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

ADMIN = {"Authorization": "Bearer admin-key"}


def tenant_with_demo_adapters(url: str, name: str, demo_assets) -> str:
    """Create tenant `name`, upload the three demo adapters to it; its key."""
    tenant = httpx.post(f"{url}/admin/api/tenants", json={"name": name}, headers=ADMIN)
    assert tenant.status_code == 201, tenant.text
    key = httpx.post(
        f"{url}/admin/api/tenants/{tenant.json()['id']}/keys", json={}, headers=ADMIN
    ).json()["key"]
    for adapter, directory in demo_assets.adapters.items():
        files = {
            "config": (
                "adapter_config.json",
                (directory / "adapter_config.json").read_bytes(),
            ),
            "weights": (
                "adapter_model.safetensors",
                (directory / "adapter_model.safetensors").read_bytes(),
            ),
        }
        up = httpx.post(
            f"{url}/v1/adapters",
            data={"name": adapter},
            files=files,
            headers={"Authorization": f"Bearer {key}"},
        )
        assert up.status_code == 201, up.text
    return key


def gauges(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) → value."""
    text = httpx.get(f"{url}/metrics", headers=ADMIN).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def in_flight(server) -> dict[str, object]:
    """Everything that counts a request in flight, read inside the server."""
    state, pool = server.state, server.services.pool
    engine = state.client.stats()
    admission = state.admission.stats()
    return {
        "engine_requests": state.client.num_active,
        "engine_running": engine.num_running,
        "engine_waiting": engine.num_waiting,
        "admission_waiting": admission.waiting,
        "seats_in_use": admission.seats_in_use,
        "tenants_active": {t: n for t, n in admission.active_by_tenant.items() if n},
        "tenants_counted": {t: n for t, n in state.active_by_tenant.items() if n},
        "pins": {e.key: e.pins for e in pool.snapshot() if e.pins},
    }


IDLE = {
    "engine_requests": 0,
    "engine_running": 0,
    "engine_waiting": 0,
    "admission_waiting": 0,
    "seats_in_use": 0,
    "tenants_active": {},
    "tenants_counted": {},
    "pins": {},
}


def wait_idle(server, timeout: float = 30.0) -> dict[str, object]:
    """Wait until nothing is in flight; the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        now = in_flight(server)
        if now == IDLE or time.monotonic() > deadline:
            return now
        time.sleep(0.05)
