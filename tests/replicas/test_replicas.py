"""Engine replicas under Ray Serve, on a local Ray cluster with the demo model on the CPU.

Two replicas serve the demo adapters and the base model mixed: every answer equals the
one-process server's (greedy), calls go to a replica that already holds their adapter, and
killing a replica fails only the calls it was running, with the retryable 503.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import defaultdict

import httpx
import pytest
from replica_utils import free_port, serving

from loraplex import serve
from loraplex.demo import QUESTIONS
from loraplex.serve_settings import ServeSettings

ray = pytest.importorskip("ray")

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
    hits: dict[str, list[bool]] = defaultdict(list)
    for i in range(0, len(served), len(models)):
        wave = served[i : i + len(models)]
        for model, _, replica in wave:
            if model != BASE:
                hits[model].append(replica in held_by[model])
        for model, _, replica in wave:
            held_by[model].add(replica)
    for model, routed in hits.items():  # every adapter, not just on average
        assert sum(routed) / len(routed) >= 0.8, (model, routed, served)

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
    # The n choices of a call run on one replica, each with its own stream.
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json=chat_body(adapter, PROMPTS[1], n=3),
        headers=headers,
        timeout=60,
    )
    assert r.status_code == 200 and "," not in r.headers["x-loraplex-replica"]
    texts = [c["message"]["content"] for c in r.json()["choices"]]
    assert texts == [expected[adapter, PROMPTS[1]]] * 3


def _until(check, timeout_s: float = 15):
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return found


def test_admin_pin_unpin_and_evict_reach_the_replicas(fleet):
    url, _, _ = fleet

    def entry(adapter_id):
        pool = httpx.get(f"{url}/admin/api/pool", headers=ADMIN).json()
        return next((e for e in pool["entries"] if e["id"] == adapter_id), None)

    def held():
        pool = httpx.get(f"{url}/admin/api/pool", headers=ADMIN).json()
        return [e["id"] for e in pool["entries"] if e["on_device"]]

    adapter_id = _until(held)[0]
    pin = httpx.post(f"{url}/admin/api/adapters/{adapter_id}/pin", headers=ADMIN)
    assert pin.status_code == 200 and isinstance(pin.json()["slot"], int), pin.text
    _until(lambda: (e := entry(adapter_id)) and e["pinned"])  # reported by a replica
    busy = httpx.post(f"{url}/admin/api/adapters/{adapter_id}/evict", headers=ADMIN)
    assert busy.status_code == 409
    unpin = httpx.post(f"{url}/admin/api/adapters/{adapter_id}/unpin", headers=ADMIN)
    assert unpin.json()["unpinned"] is True
    _until(lambda: (e := entry(adapter_id)) and not e["pinned"])  # through the board
    evict = httpx.post(f"{url}/admin/api/adapters/{adapter_id}/evict", headers=ADMIN)
    assert evict.status_code == 200, evict.text
    _until(lambda: entry(adapter_id) is None)  # gone from every replica


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


def _kill_replica(replica_id: str) -> None:
    """Kill a replica's actor the way a crash would (Ray Serve starts a new one)."""
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and a["name"].endswith(replica_id)
    ]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)


def _retryable(r: httpx.Response) -> bool:
    error = r.json()["error"]
    return (
        r.status_code == 503
        and int(r.headers["retry-after"]) >= 1
        and error["type"] == "service_unavailable"
    )


def test_a_killed_replica_fails_only_its_calls_and_the_rest_keeps_serving(
    fleet, models, expected
):
    url, server, headers = fleet
    adapters = [m for m in models if m != BASE]
    long = {"max_tokens": 400, "ignore_eos": True}
    outcomes: dict[int, str] = {}  # stream index → "done" or the error event
    replicas: dict[int, str] = {}
    started = {i: asyncio.Event() for i in range(len(adapters) * 2)}

    async def stream(client, i, model):
        body = chat_body(model, PROMPTS[1], stream=True, **long)
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=headers
        ) as r:
            assert r.status_code == 200
            replicas[i] = r.headers["x-loraplex-replica"]
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                started[i].set()
                if line == "data: [DONE]":
                    outcomes[i] = "done"
                elif "error" in json.loads(line[6:]):
                    outcomes[i] = json.loads(line[6:])["error"]

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            tasks = [
                asyncio.create_task(stream(client, i, adapters[i % len(adapters)]))
                for i in started
            ]
            for event in started.values():
                await asyncio.wait_for(event.wait(), 60)
            victim = replicas[0]
            # A non-streaming call to the victim's adapter, in flight during the kill.
            blocking = asyncio.create_task(
                _chat(client, url, headers, adapters[0], PROMPTS[2], **long)
            )
            await asyncio.sleep(0.3)
            _kill_replica(victim)
            await asyncio.gather(*tasks)
            return victim, await blocking

    victim, blocking = asyncio.run(main())
    assert len(set(replicas.values())) == 2  # calls were running on both replicas
    for i, outcome in outcomes.items():
        if replicas[i] == victim:  # ended with the one error shape, retryable
            assert outcome["type"] == "service_unavailable", outcome
            assert outcome["code"] == "engine_unavailable", outcome
        else:
            assert outcome == "done", (i, outcome)
    assert len(outcomes) == len(started)
    assert blocking.status_code == 200 or _retryable(blocking), blocking.text

    # Every model keeps answering, right, with nothing but retryable errors meanwhile.
    async def after():
        async with httpx.AsyncClient() as client:
            for model in models:
                for _ in range(20):
                    r = await _chat(client, url, headers, model, PROMPTS[0])
                    if r.status_code == 200:
                        break
                    assert _retryable(r), r.text
                    await asyncio.sleep(0.5)
                assert r.status_code == 200
                text = r.json()["choices"][0]["message"]["content"]
                assert text == expected[model, PROMPTS[0]]

    asyncio.run(after())
    deadline = time.monotonic() + 60  # Ray Serve starts a new replica; the dead one's
    while True:  # last report goes stale
        server.view.refresh()
        alive = {r.replica_id for r in server.view.reports() if r.alive}
        if len(alive) == 2 and victim not in alive:
            break
        assert time.monotonic() < deadline, alive
        time.sleep(0.5)


def test_the_importable_app_serves_through_ray_serves_proxy(
    ray_cluster, demo_assets, expected, tmp_path
):
    """`serve run loraplex.replicas.app:build_app model=... replicas=1`, in-process."""
    from ray import serve as ray_serve

    from loraplex.replicas import build_app

    options = make_settings(tmp_path / "data", replicas=1).model_dump()
    options |= {"model": str(demo_assets.model), "admin_key": "admin-key"}
    ray_serve.run(build_app(options), name="imported", route_prefix="/")
    url = ray_cluster
    try:
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, httpx.get(f"{url}/readyz").text
            time.sleep(0.5)
        tenant = httpx.post(
            f"{url}/admin/api/tenants", json={"name": "acme"}, headers=ADMIN
        ).json()
        key = httpx.post(
            f"{url}/admin/api/tenants/{tenant['id']}/keys", json={}, headers=ADMIN
        ).json()["key"]
        headers = {"Authorization": f"Bearer {key}"}
        name, directory = next(iter(demo_assets.adapters.items()))
        files = {
            part: (file, (directory / file).read_bytes())
            for part, file in (
                ("config", "adapter_config.json"),
                ("weights", "adapter_model.safetensors"),
            )
        }
        upload = httpx.post(
            f"{url}/v1/adapters", data={"name": name}, files=files, headers=headers
        )
        assert upload.status_code == 201, upload.text
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json=chat_body(name, PROMPTS[0]),
            headers=headers,
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-loraplex-replica"]
        assert (
            r.json()["choices"][0]["message"]["content"] == expected[name, PROMPTS[0]]
        )
    finally:
        ray_serve.delete("imported")
