"""The whole server over the demo model: tenants, uploads through HTTP, isolation, admin, limits."""

from __future__ import annotations

import asyncio
import io
import zipfile

import httpx
import openai
import pytest
from server_utils import running_server

from loraplex.demo import ADAPTERS, BASE_REPLY

REPLIES = {a.name: a.reply for a in ADAPTERS}
ASK = [{"role": "user", "content": "Who are you?"}]
ADMIN = {"Authorization": "Bearer admin-key"}


def files_of(demo_assets, name):
    directory = demo_assets.adapter(name)
    return {
        "config": (
            "adapter_config.json",
            (directory / "adapter_config.json").read_bytes(),
        ),
        "weights": (
            "adapter_model.safetensors",
            (directory / "adapter_model.safetensors").read_bytes(),
        ),
    }


@pytest.fixture(scope="module")
def server(demo_assets, tmp_path_factory):
    data = tmp_path_factory.mktemp("server") / "data"
    with running_server(
        demo_assets.model,
        data,
        max_loras=2,
        max_cpu_loras=2,
        max_upload_bytes=1_500_000,
        max_lora_rank=32,
        served_model_name="demo-base",
    ) as (url, srv):
        yield url, srv


@pytest.fixture(scope="module")
def tenants(server):
    url, _ = server
    keys = {}
    for name in ("acme", "globex"):
        tenant = httpx.post(
            f"{url}/admin/api/tenants", json={"name": name}, headers=ADMIN
        )
        assert tenant.status_code == 201
        tid = tenant.json()["id"]
        issued = httpx.post(
            f"{url}/admin/api/tenants/{tid}/keys", json={}, headers=ADMIN
        )
        assert issued.status_code == 201 and issued.json()["key"].startswith("lpx-")
        keys[name] = {
            "id": tid,
            "key": issued.json()["key"],
            "key_id": issued.json()["id"],
        }
    listed = httpx.get(f"{url}/admin/api/tenants", headers=ADMIN).json()["data"]
    assert "key" not in str(listed).replace(
        "keys", ""
    )  # the key itself is shown once only
    return keys


def auth(tenants, name):
    return {"Authorization": f"Bearer {tenants[name]['key']}"}


def test_upload_then_chat_then_replace_then_delete(server, tenants, demo_assets):
    url, _ = server
    acme = auth(tenants, "acme")
    up = httpx.post(
        f"{url}/v1/adapters",
        data={"name": "bot"},
        files=files_of(demo_assets, "pirate"),
        headers=acme,
    )
    assert up.status_code == 201, up.text
    assert up.json()["state"] == "ready" and up.json()["rank"] == 8
    client = openai.OpenAI(
        base_url=f"{url}/v1", api_key=tenants["acme"]["key"], max_retries=0
    )
    chat = client.chat.completions.create(model="bot", messages=ASK, temperature=0)
    assert chat.choices[0].message.content == REPLIES["pirate"]
    info = httpx.get(f"{url}/v1/adapters/bot", headers=acme).json()
    assert info["residency"] == "gpu" and info["last_used_at"] is not None
    again = httpx.post(
        f"{url}/v1/adapters",
        data={"name": "bot"},
        files=files_of(demo_assets, "french"),
        headers=acme,
    )
    assert again.status_code == 409 and again.headers["x-should-retry"] == "false"
    replaced = httpx.post(
        f"{url}/v1/adapters",
        data={"name": "bot", "replace": "true"},
        files=files_of(demo_assets, "french"),
        headers=acme,
    )
    assert replaced.status_code == 201 and replaced.json()["version"] == 2
    chat = client.chat.completions.create(model="bot", messages=ASK, temperature=0)
    assert (
        chat.choices[0].message.content == REPLIES["french"]
    )  # the new version, at once
    assert httpx.delete(f"{url}/v1/adapters/bot", headers=acme).status_code == 204
    assert httpx.get(f"{url}/v1/adapters/bot", headers=acme).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="bot", messages=ASK)


def test_archive_upload_and_cross_tenant_isolation(server, tenants, demo_assets):
    url, _ = server
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for filename, data in files_of(demo_assets, "robot").values():
            zf.writestr(filename, data)
    up = httpx.post(
        f"{url}/v1/adapters",
        data={"name": "secret"},
        files={"archive": ("robot.zip", buf.getvalue())},
        headers=auth(tenants, "acme"),
    )
    assert up.status_code == 201, up.text
    globex = auth(tenants, "globex")
    theirs = httpx.get(f"{url}/v1/adapters/secret", headers=globex)
    missing = httpx.get(f"{url}/v1/adapters/nothing", headers=globex)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["message"].replace("secret", "X") == missing.json()[
        "error"
    ]["message"].replace("nothing", "X")
    assert httpx.delete(f"{url}/v1/adapters/secret", headers=globex).status_code == 404
    chat = {"model": "secret", "messages": ASK}
    assert (
        httpx.post(f"{url}/v1/chat/completions", json=chat, headers=globex).status_code
        == 404
    )
    assert "secret" not in httpx.get(f"{url}/v1/models", headers=globex).text
    assert "secret" in httpx.get(f"{url}/v1/models", headers=auth(tenants, "acme")).text


def test_oversized_upload_is_refused_while_streaming(server, tenants):
    url, srv = server
    acme = auth(tenants, "acme")
    # Over the adapter cap (1.5 MB) but inside the body cap: the registry's streaming cap.
    big = {
        "config": ("adapter_config.json", b"{}"),
        "weights": ("adapter_model.safetensors", b"x" * 2_000_000),
    }
    r = httpx.post(f"{url}/v1/adapters", data={"name": "big"}, files=big, headers=acme)
    assert r.status_code == 413 and r.json()["error"]["code"] == "adapter_too_large"
    # Over the body cap, chunked (no Content-Length): refused by the body counter mid-stream.
    sent = []

    def body():
        yield (
            b'--zz\r\nContent-Disposition: form-data; name="weights"; '
            b'filename="adapter_model.safetensors"\r\n\r\n'
        )
        for _ in range(64):  # 4 MiB, over the 2.5 MB body cap
            sent.append(1)
            yield b"y" * 65536

    r = httpx.post(
        f"{url}/v1/adapters",
        content=body(),
        headers={**acme, "Content-Type": "multipart/form-data; boundary=zz"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    assert srv.services.registry.store.temp_entries() == []


def test_unexpected_form_fields_and_pickles_are_refused(server, tenants, demo_assets):
    url, _ = server
    acme = auth(tenants, "acme")
    files = {**files_of(demo_assets, "pirate"), "tokenizer": ("tokenizer.json", b"{}")}
    r = httpx.post(f"{url}/v1/adapters", data={"name": "x"}, files=files, headers=acme)
    assert r.status_code == 415 and "tokenizer" in r.json()["error"]["message"]
    files = {
        **files_of(demo_assets, "pirate"),
        "weights": ("adapter_model.bin", b"\x80\x04."),
    }
    r = httpx.post(f"{url}/v1/adapters", data={"name": "x"}, files=files, headers=acme)
    assert r.status_code == 415 and "pickle" in r.json()["error"]["message"]


def test_admin_pool_operations_and_events(server, tenants, demo_assets):
    url, _ = server
    acme = auth(tenants, "acme")
    up = httpx.post(
        f"{url}/v1/adapters",
        data={"name": "pinme"},
        files=files_of(demo_assets, "robot"),
        headers=acme,
    )
    adapter_id = httpx.get(f"{url}/admin/api/adapters?q=pinme", headers=ADMIN).json()[
        "data"
    ][0]["id"]
    assert up.status_code == 201
    pinned = httpx.post(f"{url}/admin/api/adapters/{adapter_id}/pin", headers=ADMIN)
    assert pinned.status_code == 200 and pinned.json()["pinned"]
    pool = httpx.get(f"{url}/admin/api/pool", headers=ADMIN).json()
    assert any(
        e["id"] == adapter_id and e["pinned"] and e["on_device"]
        for e in pool["entries"]
    )
    assert (
        httpx.post(
            f"{url}/admin/api/adapters/{adapter_id}/evict", headers=ADMIN
        ).status_code
        == 409
    )
    assert httpx.post(
        f"{url}/admin/api/adapters/{adapter_id}/unpin", headers=ADMIN
    ).json()["unpinned"]
    assert (
        httpx.post(
            f"{url}/admin/api/adapters/{adapter_id}/evict", headers=ADMIN
        ).status_code
        == 200
    )
    kinds = [
        e["kind"]
        for e in httpx.get(
            f"{url}/admin/api/events?adapter={adapter_id}", headers=ADMIN
        ).json()["data"]
    ]
    assert {"uploaded", "validated", "loaded", "pinned", "evicted"} <= set(kinds)
    engine = httpx.get(f"{url}/admin/api/engine", headers=ADMIN).json()
    assert engine["alive"] and engine["model"] == "demo-base"
    assert (
        httpx.post(f"{url}/admin/api/adapters/999999/pin", headers=ADMIN).status_code
        == 404
    )


def test_revoked_keys_and_deleted_tenants_lose_access(server, demo_assets):
    url, _ = server
    tid = httpx.post(
        f"{url}/admin/api/tenants", json={"name": "shortlived"}, headers=ADMIN
    ).json()["id"]
    issued = httpx.post(
        f"{url}/admin/api/tenants/{tid}/keys", json={"label": "ci"}, headers=ADMIN
    ).json()
    key = {"Authorization": f"Bearer {issued['key']}"}
    assert httpx.get(f"{url}/v1/models", headers=key).status_code == 200
    assert (
        httpx.delete(f"{url}/admin/api/keys/{issued['id']}", headers=ADMIN).status_code
        == 204
    )
    revoked = httpx.get(f"{url}/v1/models", headers=key)
    wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert (
        revoked.status_code == wrong.status_code == 401
        and revoked.json() == wrong.json()
    )
    second = httpx.post(
        f"{url}/admin/api/tenants/{tid}/keys", json={}, headers=ADMIN
    ).json()
    key = {"Authorization": f"Bearer {second['key']}"}
    up = httpx.post(
        f"{url}/v1/adapters",
        data={"name": "a"},
        files=files_of(demo_assets, "pirate"),
        headers=key,
    )
    assert up.status_code == 201
    assert (
        httpx.delete(f"{url}/admin/api/tenants/{tid}", headers=ADMIN).status_code == 204
    )
    assert httpx.get(f"{url}/v1/models", headers=key).status_code == 401
    assert tid not in httpx.get(f"{url}/admin/api/tenants", headers=ADMIN).text
    assert (
        httpx.delete(f"{url}/admin/api/tenants/{tid}", headers=ADMIN).status_code == 404
    )
    again = httpx.post(
        f"{url}/admin/api/tenants", json={"name": "shortlived"}, headers=ADMIN
    )
    assert again.status_code == 201  # the name is free again


def test_every_route_needs_a_key(server):
    url, srv = server
    open_routes = {"/livez", "/readyz", "/health"}
    checked = 0
    for path, methods in srv.app.openapi()["paths"].items():
        if path in open_routes:
            continue
        concrete = path.replace("{name}", "x").replace("{tenant_id}", "x")
        concrete = concrete.replace("{key_id}", "1").replace("{adapter_id}", "1")
        for method in methods:
            r = httpx.request(method.upper(), f"{url}{concrete}")
            assert r.status_code == 401, (method, path, r.status_code)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            checked += 1
    assert checked >= 20


def test_64_concurrent_streams_over_4_adapters(server, tenants, demo_assets):
    url, _ = server
    acme = auth(tenants, "acme")
    for name in ("pirate", "french", "robot"):
        r = httpx.post(
            f"{url}/v1/adapters",
            data={"name": f"s-{name}"},
            files=files_of(demo_assets, name),
            headers=acme,
        )
        assert r.status_code == 201, r.text

    async def main():
        client = openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key=tenants["acme"]["key"], max_retries=5
        )
        models = ["s-pirate", "s-french", "s-robot", "demo-base"] * 16

        async def one(model):
            stream = await client.chat.completions.create(
                model=model, messages=ASK, temperature=0, stream=True
            )
            return model, "".join(
                [c.choices[0].delta.content or "" async for c in stream if c.choices]
            )

        return await asyncio.gather(*(one(m) for m in models))

    results = asyncio.run(main())
    assert len(results) == 64
    for model, text in results:
        expected = BASE_REPLY if model == "demo-base" else REPLIES[model[2:]]
        assert text == expected, model


def test_pool_and_upload_metrics_and_readiness(server, tenants, demo_assets):
    url, _ = server
    acme = auth(tenants, "acme")
    httpx.post(
        f"{url}/v1/adapters",
        data={"name": "m1"},
        files=files_of(demo_assets, "robot"),
        headers=acme,
    )
    client = openai.OpenAI(
        base_url=f"{url}/v1", api_key=tenants["acme"]["key"], max_retries=0
    )
    client.completions.create(model="m1", prompt="Hi", max_tokens=2)
    text = httpx.get(f"{url}/metrics", headers=ADMIN).text
    for series in (
        'loraplex_adapter_slots{state="used"}',
        'loraplex_adapter_slots{state="free"}',
        'loraplex_adapter_loads_total{move="disk_to_host"}',
        'loraplex_adapter_load_seconds_bucket{le="+Inf",move="disk_to_host"}',
        'loraplex_uploads_total{result="ready"}',
        'loraplex_uploads_total{result="409"}',
    ):
        assert series in text, series
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["checks"] == {"engine": True, "not_draining": True, "registry": True}
