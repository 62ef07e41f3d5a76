"""The admin UI in headless Chromium (Debian's, driven by Playwright): an operator's session
from sign-in to sign-out, with a screenshot of every page under test-artifacts/admin_ui/."""

from __future__ import annotations

import json
import os
import shutil

import openai
import pytest
from ui_helpers import ADMIN_KEY, ARTIFACTS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LAPTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}
ASK = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium; `make test` installs it. Outside CI a machine without it skips."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: `make test` installs it with apt")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def context(browser):
    """A fresh browser profile; script errors and CSP violations fail the test."""
    context = browser.new_context(viewport=LAPTOP)
    context.set_default_timeout(15_000)
    errors: list[str] = []

    def on_console(message) -> None:
        # Chromium logs every 4xx answer as "Failed to load resource"; those are expected.
        if message.type == "error" and "Failed to load resource" not in message.text:
            errors.append(message.text)

    context.on("console", on_console)
    context.on("weberror", lambda e: errors.append(str(e.error)))
    yield context
    context.close()
    assert not errors, errors


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(page, url: str, key: str = ADMIN_KEY) -> None:
    page.goto(f"{url}/admin/overview")
    page.fill("#key", key)
    page.click("button[type=submit]")


def upload(page, tenant: str, name: str, config, weights) -> str:
    """Upload through the form (XHR with a progress bar); returns the result message."""
    page.goto(f"{page.url.split('/admin')[0]}/admin/adapters")
    form = page.locator("#upload")
    if page.locator("#upload-card").get_attribute("open") is None:
        page.click("#upload-card summary")  # the form is folded once adapters exist
    form.locator("select[name=tenant]").select_option(label=tenant)
    form.locator("input[name=name]").fill(name)
    form.locator("input[name=config]").set_input_files(config)
    form.locator("input[name=weights]").set_input_files(weights)
    form.locator("button[type=submit]").click()
    result = page.locator("#upload-result")
    result.locator("xpath=self::*[contains(@class, 'flash')]").wait_for()
    return result.inner_text()


def test_an_operators_session(ui_server, context, demo_assets, tmp_path):
    url, _ = ui_server
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())

    # Signing in: a wrong key is refused and leaves no session.
    page.goto(f"{url}/admin/pool")
    assert "/admin/login" in page.url
    shot(page, "login")
    page.fill("#key", "not-the-key")
    page.click("button[type=submit]")
    assert "not the admin key" in page.inner_text(".flash-error")
    assert not [c for c in context.cookies() if c["name"] == "loraplex_admin"]
    page.fill("#key", ADMIN_KEY)
    page.click("button[type=submit]")
    page.wait_for_url("**/admin/pool")
    cookie = next(c for c in context.cookies() if c["name"] == "loraplex_admin")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # A tenant and a key, shown once.
    page.goto(f"{url}/admin/tenants")
    page.fill("#tenant-name", "acme")
    page.click("text=Create tenant")
    row = page.locator('tr[data-tenant="acme"]')
    row.locator("input[name=label]").fill("ci")
    row.locator("text=Issue key").click()
    key = page.inner_text("#new-key").strip()
    assert key.startswith("lpx-")
    shot(page, "tenants")
    page.reload()
    assert page.locator("#new-key").count() == 0  # shown once only

    # Uploads through the form: two good adapters, one refused with its reason.
    pirate, french = demo_assets.adapter("pirate"), demo_assets.adapter("french")
    message = upload(
        page,
        "acme",
        "pirate-bot",
        pirate / "adapter_config.json",
        pirate / "adapter_model.safetensors",
    )
    assert "uploaded and validated" in message, message
    assert page.locator("#upload-progress").evaluate("p => p.value") == 100
    upload(
        page,
        "acme",
        "french-bot",
        french / "adapter_config.json",
        french / "adapter_model.safetensors",
    )
    bad = json.loads((french / "adapter_config.json").read_text())
    bad["use_dora"] = True
    bad_config = tmp_path / "adapter_config.json"
    bad_config.write_text(json.dumps(bad))
    refused = upload(
        page, "acme", "dora-bot", bad_config, french / "adapter_model.safetensors"
    )
    assert "Upload refused (422)" in refused and "DoRA" in refused, refused
    failed_row = page.locator('tr[data-adapter="dora-bot"]')
    assert "failed" in failed_row.inner_text() and "DoRA" in failed_row.inner_text()

    # A request with the new key, through the OpenAI API; the adapter lands in a GPU slot.
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(
        model="pirate-bot", messages=ASK, max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content
    page.goto(f"{url}/admin/pool")
    slot = page.locator('li.slot[data-adapter="pirate-bot"]')
    assert "LRU" in slot.inner_text() and "acme" in slot.inner_text()

    # Pin it, delete the other one.
    page.goto(f"{url}/admin/adapters")
    page.locator('tr[data-adapter="pirate-bot"]').locator("text=Pin").click()
    assert "pinned in GPU slot" in page.inner_text(".flash")
    assert (
        "pinned" in page.locator('tr[data-adapter="pirate-bot"] td.where').inner_text()
    )
    page.locator('tr[data-adapter="french-bot"]').locator("text=Delete").click()
    assert "french-bot deleted" in page.inner_text(".flash")
    assert page.locator('tr[data-adapter="french-bot"]').count() == 0
    shot(page, "adapters")
    page.goto(f"{url}/admin/pool")
    assert "pinned" in page.locator('li.slot[data-adapter="pirate-bot"]').inner_text()
    page.wait_for_timeout(3500)  # one live refresh of the grid and the charts
    assert page.locator('li.slot.pinned[data-adapter="pirate-bot"]').count() == 1
    shot(page, "pool")

    # The events, newest first, filtered by adapter.
    page.goto(f"{url}/admin/events")
    kinds = page.locator("#events tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.kind)"
    )
    assert {"pinned", "deleted", "loaded", "validated", "failed"} <= set(kinds)
    shot(page, "events")
    page.fill("input[name=adapter]", "pirate-bot")
    page.click("text=Filter")
    kinds = page.locator("#events tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.kind)"
    )
    assert kinds[0] == "pinned" and kinds[-1] == "uploaded"

    # The overview's live cards and charts.
    page.goto(f"{url}/admin/overview")
    page.wait_for_timeout(4500)  # two refreshes: tokens/s and the charts have points
    assert page.inner_text('[data-field="status"]') == "ready"
    assert page.inner_text('[data-field="model"]') == "demo-base"
    assert page.locator("canvas[data-series]").count() == 4
    shot(page, "overview")

    # A state change without the CSRF token is refused, even with the session cookie.
    forged = page.request.post(f"{url}/admin/tenants", form={"name": "forged"})
    assert forged.status == 403
    page.goto(f"{url}/admin/tenants")
    assert page.locator('tr[data-tenant="forged"]').count() == 0

    # Signing out ends the session.
    page.click("text=Sign out")
    page.wait_for_url("**/admin/login")
    page.goto(f"{url}/admin/adapters")
    assert "/admin/login" in page.url


def test_pages_fit_a_phone(ui_server, browser):
    url, _ = ui_server
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = context.new_page()
    sign_in(page, url)
    page.wait_for_url("**/admin/overview")
    for name in ("overview", "tenants", "adapters", "pool", "events"):
        page.goto(f"{url}/admin/{name}")
        if name == "overview":
            page.wait_for_timeout(2500)
        # Wide tables scroll inside their frame; the page itself never scrolls sideways.
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 1, (name, overflow)
        shot(page, f"phone-{name}")
    context.close()
