"""Engine replicas under Ray Serve, on a local Ray cluster with the demo model on the CPU.

Two replicas serve the demo adapters and the base model mixed: every answer equals the
one-process server's (greedy), calls go to a replica that already holds their adapter, and
killing a replica fails only the calls it was running, with the retryable 503.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import defaultdict

import httpx
import pytest

from conftest import free_port, ray, serving
from loraplex import serve
from loraplex.demo import QUESTIONS
from loraplex.serve_settings import ServeSettings

ADMIN = {"Authorization": "Bearer admin-key"}
BASE = "demo-base"
PROMPTS = QUESTIONS[:4]
MAX_TOKENS = 24


def make_settings(data_dir, **options) -> ServeSettings:
    return ServeSettings(
        data_dir=data_dir,
        device="cpu",
        dtype="float32",
        admin_key="admin-key",
        served_model_name=BASE,
        max_loras=4,
        max_cpu_loras=8,
        **options,
    )


def chat_body(model: str, prompt: str, **extra) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        **extra,
    }


@pytest.fixture(scope="module")
def models(demo_assets):
    return [*demo_assets.adapters, BASE]


@pytest.fixture(scope="module")
def expected(demo_assets, models, tmp_path_factory):
    """(model, prompt) → the one-process server's greedy reply."""
    settings = make_settings(tmp_path_factory.mktemp("one") / "data")
    server = serve.build_server(settings, demo_assets.model, say=lambda _: None)
    key = serve.bootstrap_demo(server, demo_assets.adapters)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with serving(server.app, free_port()) as url:
            replies = {}
            for model in models:
                for prompt in PROMPTS:
                    r = httpx.post(
                        f"{url}/v1/chat/completions",
                        json=chat_body(model, prompt),
                        headers=headers,
                        timeout=60,
                    )
                    assert r.status_code == 200, r.text
                    message = r.json()["choices"][0]["message"]
                    replies[model, prompt] = message["content"]
            return replies
    finally:
        server.close()


@pytest.fixture(scope="module")
def fleet(ray_cluster, demo_assets, tmp_path_factory):
    """`loraplex serve --replicas 2` in this process: (url, server, tenant headers)."""
    from loraplex.replicas import build_replica_server

    settings = make_settings(tmp_path_factory.mktemp("fleet") / "data", replicas=2)
    server = build_replica_server(settings, demo_assets.model, say=lambda _: None)
    assert server.view.wait_for(2, timeout_s=60)
    key = serve.bootstrap_demo(server, demo_assets.adapters)
    try:
        with serving(server.app, free_port()) as url:
            yield url, server, {"Authorization": f"Bearer {key}"}
    finally:
        server.close()


async def _chat(client: httpx.AsyncClient, url, headers, model, prompt, **extra):
    return await client.post(
        f"{url}/v1/chat/completions",
        json=chat_body(model, prompt, **extra),
        headers=headers,
        timeout=120,
    )


def test_mixed_adapters_match_one_process_and_go_where_held(fleet, models, expected):
    url, _, headers = fleet
    served: list[tuple[str, str, str]] = []  # (model, prompt, replica) in wave order

    async def run_waves():
        async with httpx.AsyncClient() as client:
            for _ in range(3):
                for prompt in PROMPTS:
                    calls = [_chat(client, url, headers, m, prompt) for m in models]
                    replies = await asyncio.gather(*calls)
                    for model, r in zip(models, replies, strict=True):
                        assert r.status_code == 200, r.text
                        text = r.json()["choices"][0]["message"]["content"]
                        assert text == expected[model, prompt], (model, prompt)
                        served.append((model, prompt, r.headers["x-loraplex-replica"]))

    asyncio.run(run_waves())
    assert len({replica for _, _, replica in served}) == 2  # both replicas served
    # A call counts as routed to a holder when its replica had served its adapter in an
    # earlier wave (so it held the adapter before the call was sent).
    held_by: dict[str, set[str]] = defaultdict(set)
    hits = calls = 0
    for i in range(0, len(served), len(models)):
        wave = served[i : i + len(models)]
        for model, _, replica in wave:
            if model != BASE:
                calls += 1
                hits += replica in held_by[model]
        for model, _, replica in wave:
            held_by[model].add(replica)
    assert hits / calls >= 0.8, (hits, calls, served)

    pool = httpx.get(f"{url}/admin/api/pool", headers=ADMIN).json()
    assert {e["id"] for e in pool["entries"] if e["on_device"]}  # the fleet's view
    metrics = httpx.get(f"{url}/metrics", headers=ADMIN).text
    assert "vllm:num_requests_running" in metrics
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_streaming_through_a_replica(fleet, demo_assets, expected):
    url, _, headers = fleet
    adapter = next(iter(demo_assets.adapters))
    body = chat_body(adapter, PROMPTS[0], stream=True)
    text = ""
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["x-loraplex-replica"]
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content", "")
    assert text == expected[adapter, PROMPTS[0]]


def test_the_replica_checks_the_registry_sha256(ray_cluster, demo_assets):
    from loraplex.adapters_registry import AdapterCorrupt
    from loraplex.adapters_registry.artifacts import content_digest
    from loraplex.replicas.replica import fetch_verified
    from loraplex.replicas.wire import AdapterSource

    directory = next(iter(demo_assets.adapters.values()))
    files = (
        (directory / "adapter_config.json").read_bytes(),
        (directory / "adapter_model.safetensors").read_bytes(),
    )
    digest = content_digest(
        {
            "adapter_config.json": hashlib.sha256(files[0]).hexdigest(),
            "adapter_model.safetensors": hashlib.sha256(files[1]).hexdigest(),
        }
    )
    good = AdapterSource("7", digest, ray.put(files))
    assert fetch_verified(good, "test") == files
    tampered = AdapterSource("7", digest, ray.put((files[0], files[1][:-1] + b"!")))
    with pytest.raises(AdapterCorrupt, match="not the registry's"):
        fetch_verified(tampered, "test")
