"""What the pages show: the data functions behind each page and its JSON twin."""

from __future__ import annotations

import json
import math
import time
import uuid

import httpx
import openai
from ui_helpers import ADMIN_KEY

from loraplex.admin_ui.history import History, latency, series, tokens_per_s
from loraplex.admin_ui.metrics_read import MetricsReading, quantile

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ASK = [{"role": "user", "content": "Who are you?"}]


def test_quantiles_follow_promql_histogram_quantile():
    buckets = ((0.1, 10.0), (0.2, 20.0), (0.4, 40.0), (math.inf, 40.0))
    assert quantile(0.5, buckets) == 0.2
    assert abs(quantile(0.25, buckets) - 0.1 * 1.0) < 1e-9
    assert abs(quantile(0.99, buckets) - (0.2 + 0.2 * (39.6 - 20) / 20)) < 1e-9
    assert quantile(0.5, ((0.1, 0.0), (math.inf, 0.0))) is None
    assert quantile(0.99, ((0.1, 1.0), (math.inf, 5.0))) == 0.1  # past the last bound


def test_history_rates_and_windowed_latency():
    clock = [100.0]
    history = History(min_interval_s=1.0, clock=lambda: clock[0])
    inf = math.inf
    readings = iter(
        [
            MetricsReading(generation_tokens=0, ttft=((0.1, 0), (inf, 0))),
            MetricsReading(generation_tokens=50, ttft=((0.1, 4), (inf, 4))),
        ]
    )
    history.record(lambda: next(readings))
    clock[0] = 100.5
    assert len(history.record(lambda: next(readings))) == 1  # too soon: no new reading
    clock[0] = 110.0
    points = history.record(lambda: next(readings))
    assert tokens_per_s(points, 1) == 5.0
    assert latency(points, 1)["ttft_p50_ms"] == 50.0
    chart = series(points)
    assert chart["t"] == [-10.0, 0.0] and chart["tokens_per_s"] == [None, 5.0]


def _tenant_with_key(url: str, name: str) -> tuple[str, str]:
    tenant = httpx.post(f"{url}/admin/api/tenants", json={"name": name}, headers=ADMIN)
    tid = tenant.json()["id"]
    key = httpx.post(f"{url}/admin/api/tenants/{tid}/keys", json={}, headers=ADMIN)
    return tid, key.json()["key"]


def test_overview_tenants_and_pool_show_a_request(ui_server, admin, demo_assets):
    url, _ = ui_server
    client, csrf = admin
    tid, key = _tenant_with_key(url, "usage")
    directory = demo_assets.adapter("robot")
    up = client.post(
        "/admin/adapters/upload",
        data={"tenant": tid, "name": "robo"},
        files={
            "config": ("c.json", (directory / "adapter_config.json").read_bytes()),
            "weights": ("w", (directory / "adapter_model.safetensors").read_bytes()),
        },
        headers={"X-CSRF-Token": csrf, "Accept": "application/json"},
    )
    assert up.status_code == 201, up.text
    before = client.get("/admin/overview.json").json()
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    reply = oai.chat.completions.create(model="robo", messages=ASK, max_tokens=6)
    assert reply.usage.completion_tokens > 0
    time.sleep(1.1)  # the next reading is at least a second later
    overview = client.get("/admin/overview.json").json()
    assert overview["ready"] and overview["model"] == "demo-base"
    assert overview["generated_tokens"] >= before["generated_tokens"] + 1
    assert overview["latency_since_start"]["ttft_p50_ms"] is not None
    assert overview["tokens_per_s"] is not None and overview["tokens_per_s"] > 0
    assert len(overview["series"]["t"]) >= 2
    # The chat ran at least one prefill step and decode steps (eager on the CPU) in the minute.
    steps = {k["kind"]: k for k in overview["engine_time"]["steps"]}
    assert steps["prefill"]["steps"] >= 1 and steps["decode_eager"]["steps"] >= 1
    assert 0 < steps["prefill"]["mean_ms"] and 0 < steps["prefill"]["share"] < 1
    assert 0 < steps["prefill"]["host_ms"] <= steps["prefill"]["mean_ms"]
    assert set(overview["engine_time"]["outside_steps"]) == {
        "calls",
        "dispatch",
        "idle",
    }
    assert "Engine time, last minute" in client.get("/admin/overview").text
    usage = next(
        t for t in client.get("/admin/tenants.json").json()["tenants"] if t["id"] == tid
    )["usage"]
    assert usage["requests"] == 1 and usage["tokens"] > 0
    assert usage["adapters"] == 1 and usage["bytes"] > 0 and usage["errors"] == 0
    pool = client.get("/admin/pool.json").json()
    slot = next(s for s in pool["slots"] if s["name"] == "robo")
    assert slot["tenant_name"] == "usage" and slot["resident_since"] is not None
    assert slot["lru_rank"] is not None and not slot["pinned"]
    assert pool["hit_rates"]["device"]["misses"] >= 1
    assert pool["activity"]["loads"][-1] >= 1
    memory = pool["memory"]
    assert (
        memory["weights"] > 0 and memory["adapter_slots"] > 0 and memory["kv_cache"] > 0
    )
    events = client.get("/admin/events.json", params={"adapter": "robo"}).json()
    kinds = [e["kind"] for e in events["data"]]
    assert kinds[-2:] == ["validated", "uploaded"] and "loaded" in kinds  # newest first


def test_two_thousand_adapters_page_fast_and_filter_server_side(ui_server, admin):
    url, server = ui_server
    client, _ = admin
    tid, _ = _tenant_with_key(url, "bulk")
    catalog = server.services.registry.catalog
    now = time.time()
    rows = [
        {
            "tenant_id": tid,
            "name": f"bulk-{i:04d}",
            "version": 1,
            "state": "failed" if i % 10 == 0 else "ready",
            "rank": 8 + i % 3 * 8,
            "alpha": 16.0,
            "targets": json.dumps(["q_proj", "v_proj"]),
            "size_bytes": 1000 + i,
            "sha256": f"{i:064x}",
            "upload_id": uuid.uuid4().hex,
            "created_at": now + i,
            "updated_at": now + i,
        }
        for i in range(2000)
    ]
    with catalog.write() as db:
        db["adapters"].insert_all(rows)
    page = client.get("/admin/adapters", params={"tenant": tid, "per_page": 50})
    assert page.status_code == 200
    assert page.text.count('data-adapter="bulk-') == 50
    twin = client.get(
        "/admin/adapters.json",
        params={
            "tenant": tid,
            "sort": "name",
            "order": "asc",
            "page": 3,
            "per_page": 25,
        },
    ).json()
    assert twin["total"] == 2000 and twin["pages"] == 80
    assert [a["name"] for a in twin["data"]][:2] == ["bulk-0050", "bulk-0051"]
    failed = client.get(
        "/admin/adapters.json", params={"tenant": tid, "state": "failed"}
    ).json()
    assert failed["total"] == 200
    named = client.get("/admin/adapters.json", params={"q": "BULK-19"}).json()
    assert named["total"] == 100
    on_gpu = client.get("/admin/adapters.json", params={"tenant": tid, "where": "gpu"})
    assert on_gpu.json()["total"] == 0
    by_size = client.get(
        "/admin/adapters.json", params={"tenant": tid, "sort": "size", "order": "desc"}
    ).json()
    assert by_size["data"][0]["name"] == "bulk-1999"
    odd = client.get("/admin/adapters.json", params={"sort": "x;DROP", "page": "-1"})
    assert odd.status_code == 200 and odd.json()["query"]["sort"] == "created"
