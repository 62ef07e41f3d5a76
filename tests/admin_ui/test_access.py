"""Who may see and change what: sessions, CSRF, the sign-in form, headers and escaping."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from ui_helpers import ADMIN_KEY, PAGES, sign_in

import loraplex.admin_ui
from loraplex.admin_ui.security import CSP, SESSION_COOKIE, safe_back
from loraplex.admin_ui.sessions import SessionStore, SignInThrottle


@pytest.mark.parametrize("page", PAGES)
def test_every_page_and_twin_needs_a_session(ui_server, admin, page):
    url, _ = ui_server
    anonymous = httpx.Client(base_url=url, follow_redirects=False)
    html = anonymous.get(f"/admin/{page}")
    assert html.status_code == 303
    assert html.headers["location"] == f"/admin/login?next=/admin/{page}"
    twin = anonymous.get(f"/admin/{page}.json")
    assert twin.status_code == 401
    assert twin.json()["error"]["code"] == "invalid_session"
    forged = httpx.get(f"{url}/admin/{page}.json", cookies={SESSION_COOKIE: "forged"})
    assert forged.status_code == 401

    client, _ = admin
    html = client.get(f"/admin/{page}")
    assert html.status_code == 200 and "<h1>" in html.text
    assert html.headers["content-security-policy"] == CSP
    assert html.headers["cache-control"] == "no-store"
    twin = client.get(f"/admin/{page}.json")
    assert twin.status_code == 200 and isinstance(twin.json(), dict)


def test_the_bearer_admin_api_is_unchanged(ui_server, admin):
    url, _ = ui_server
    client, _ = admin
    assert httpx.get(f"{url}/admin/api/pool").status_code == 401
    bearer = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.get(f"{url}/admin/api/pool", headers=bearer).status_code == 200
    # a UI session is no credential for the JSON API, and the API key no UI session
    assert client.get("/admin/api/pool").status_code == 401
    assert httpx.get(f"{url}/admin/pool.json", headers=bearer).status_code == 401


def _signin_token(client: httpx.Client) -> str:
    form = client.get("/admin/login")
    return re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)


def test_sign_in_refuses_a_wrong_key_and_a_missing_form_token(ui_server):
    url, _ = ui_server
    client = httpx.Client(base_url=url, follow_redirects=False)
    token = _signin_token(client)
    wrong = client.post("/admin/login", data={"key": "admin-kez", "csrf_token": token})
    assert wrong.status_code == 401 and "not the admin key" in wrong.text
    assert SESSION_COOKIE not in client.cookies
    no_token = client.post("/admin/login", data={"key": ADMIN_KEY})
    assert no_token.status_code == 403 and SESSION_COOKIE not in client.cookies
    token = _signin_token(client)
    right = client.post(
        "/admin/login",
        data={"key": ADMIN_KEY, "csrf_token": token, "next": "https://evil.example/"},
    )
    assert right.status_code == 303
    assert right.headers["location"] == "/admin/overview"  # never off-site


def test_session_cookie_is_random_httponly_strict_and_ends_on_sign_out(ui_server):
    url, _ = ui_server
    client = httpx.Client(base_url=url, follow_redirects=False)
    token = _signin_token(client)
    signed = client.post("/admin/login", data={"key": ADMIN_KEY, "csrf_token": token})
    cookie = next(
        c for c in signed.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE)
    )
    value = cookie.split(";")[0].split("=", 1)[1]
    assert ADMIN_KEY not in value and len(value) >= 40
    flags = cookie.lower()
    assert "httponly" in flags and "samesite=strict" in flags and "path=/admin" in flags
    csrf = re.search(r'data-csrf="([^"]+)"', client.get("/admin/pool").text).group(1)
    assert client.post("/admin/logout", data={}).status_code == 403  # CSRF here too
    out = client.post("/admin/logout", data={"csrf_token": csrf})
    assert out.status_code == 303 and out.headers["location"] == "/admin/login"
    stale = httpx.get(f"{url}/admin/pool.json", cookies={SESSION_COOKIE: value})
    assert stale.status_code == 401


def test_state_changes_need_the_session_csrf_token(admin):
    client, csrf = admin
    missing = client.post("/admin/tenants", data={"name": "nocsrf"})
    assert missing.status_code == 403 and "CSRF" in missing.text
    wrong = client.post("/admin/tenants", data={"name": "nocsrf", "csrf_token": "x"})
    assert wrong.status_code == 403
    cross = client.post(
        "/admin/tenants",
        data={"name": "nocsrf", "csrf_token": csrf},
        headers={"Origin": "https://evil.example"},
    )
    assert cross.status_code == 403
    fetch = client.post(
        "/admin/adapters/upload",
        data={"tenant": "x", "name": "y"},
        headers={"Accept": "application/json"},
    )
    assert fetch.status_code == 403 and fetch.json()["error"]["code"] == "csrf_failed"
    names = [t["name"] for t in client.get("/admin/tenants.json").json()["tenants"]]
    assert "nocsrf" not in names
    made = client.post("/admin/tenants", data={"name": "withcsrf", "csrf_token": csrf})
    assert made.status_code == 303
    by_header = client.post(
        "/admin/tenants", data={"name": "byheader"}, headers={"X-CSRF-Token": csrf}
    )
    assert by_header.status_code == 303
    names = [t["name"] for t in client.get("/admin/tenants.json").json()["tenants"]]
    assert {"withcsrf", "byheader"} <= set(names)


def test_failed_upload_shows_its_reason_escaped(ui_server, admin, demo_assets):
    client, csrf = admin
    client.post("/admin/tenants", data={"name": "escaper", "csrf_token": csrf})
    tenant = next(
        t["id"]
        for t in client.get("/admin/tenants.json").json()["tenants"]
        if t["name"] == "escaper"
    )
    directory = demo_assets.adapter("pirate")
    config = json.loads((directory / "adapter_config.json").read_text())
    config["bias"] = "<img src=x onerror=alert(1)>"  # echoed in the refusal
    refused = client.post(
        "/admin/adapters/upload",
        data={"tenant": tenant, "name": "evil"},
        files={
            "config": ("adapter_config.json", json.dumps(config).encode()),
            "weights": (
                "adapter_model.safetensors",
                (directory / "adapter_model.safetensors").read_bytes(),
            ),
        },
        headers={"X-CSRF-Token": csrf, "Accept": "application/json"},
    )
    assert refused.status_code == 422, refused.text
    assert "<img src=x" in refused.json()["error"]["message"]
    page = client.get("/admin/adapters", params={"tenant": tenant, "state": "failed"})
    assert "&lt;img src=x onerror=alert(1)&gt;" in page.text
    assert "<img src=x" not in page.text


def test_templates_need_no_unsafe_csp(ui_server):
    """No inline script, event handler or style attribute: the CSP can stay strict."""
    templates = Path(loraplex.admin_ui.__file__).parent / "templates"
    for template in templates.glob("*.html"):
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), template.name
        assert not re.search(r"\son[a-z]+=", text), template.name
        assert not re.search(r"\sstyle=", text), template.name
    static = httpx.get(f"{ui_server[0]}/admin/static/app.js")
    assert static.status_code == 200 and static.headers["content-security-policy"]
    assert static.headers["x-content-type-options"] == "nosniff"


def test_redirect_targets_stay_inside_the_ui():
    assert safe_back("/admin/pool?x=1") == "/admin/pool?x=1"
    for bad in (
        "https://evil.example",
        "//evil.example",
        "/admin//evil",
        "/\\evil",
        "",
    ):
        assert safe_back(bad) == "/admin/overview"


def test_sessions_expire_and_sign_ins_are_throttled():
    now = [0.0]
    store = SessionStore(idle_s=10, max_s=100, clock=lambda: now[0])
    token, session = store.create()
    now[0] = 9
    assert store.get(token) is session
    now[0] = 18
    assert store.get(token) is session  # used at 9: still within its idle time
    now[0] = 29
    assert store.get(token) is None
    throttle = SignInThrottle(limit=3, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        assert not throttle.blocked("10.0.0.1")
        throttle.failed("10.0.0.1")
    assert throttle.blocked("10.0.0.1") and not throttle.blocked("10.0.0.2")
    now[0] += 61
    assert not throttle.blocked("10.0.0.1")


def test_a_second_sign_in_is_a_new_session(ui_server):
    first, _ = sign_in(ui_server[0])
    second, _ = sign_in(ui_server[0])
    assert first.cookies[SESSION_COOKIE] != second.cookies[SESSION_COOKIE]
