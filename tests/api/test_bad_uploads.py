"""Every bad adapter of the registry's suite, uploaded through HTTP: a clear 4xx, nothing kept."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import httpx
import pytest
from server_utils import running_server

from checkpoints import save_random_adapter, save_tiny_model

# The cases are the registry suite's own (one per validation rule), sent over HTTP here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters_registry"))
from registry_files import CONFIG, TARGETS, WEIGHTS, read_files
from test_bad_adapters import CASES

ADMIN = {"Authorization": "Bearer admin-key"}
STATUS = {"AdapterTooLarge": 413, "UnsupportedFormat": 415, "AdapterInvalid": 422}


@pytest.fixture(scope="module")
def setup(demo_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-uploads")
    model = save_tiny_model(root / "llama", "llama2")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # serve needs a tokenizer
        shutil.copy(demo_assets.model / name, model / name)
    good = read_files(save_random_adapter(model, root / "good", 8, TARGETS, seed=1))
    with running_server(
        model, root / "data", max_lora_rank=16, max_upload_bytes=1 << 22
    ) as (url, server):
        tenant = httpx.post(
            f"{url}/admin/api/tenants", json={"name": "t"}, headers=ADMIN
        )
        key = httpx.post(
            f"{url}/admin/api/tenants/{tenant.json()['id']}/keys",
            json={},
            headers=ADMIN,
        ).json()["key"]
        yield url, server, good, {"Authorization": f"Bearer {key}"}


def multipart(parts) -> list[tuple[str, tuple[str, bytes]]]:
    """The form a client would send for these files: config/weights by name, else archive."""
    fields = []
    for i, part in enumerate(parts):
        data = part.stream.read()
        if part.filename == CONFIG:
            field = "config"
        elif part.filename == WEIGHTS or part.filename.startswith("adapter_model."):
            field = "weights"
        elif len(parts) == 1:
            field = "archive"
        else:
            field = f"extra{i}"
        fields.append((field, (part.filename, data)))
    return fields


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_upload_is_refused_over_http(setup, case):
    url, server, good, headers = setup
    name, build, error, pattern = case
    store = server.services.registry.store
    before = store.stored()
    files = multipart(build(good))
    r = httpx.post(
        f"{url}/v1/adapters", data={"name": "bad"}, files=files, headers=headers
    )
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert r.headers["x-should-retry"] == "false"
    message = body["error"]["message"]
    fields = [f for f, _ in files]
    if len(set(fields)) < len(fields) or any(f.startswith("extra") for f in fields):
        # A second file in one field, or a field an upload does not have: the route refuses
        # the form before the registry sees it.
        assert r.status_code in (400, 415), message
    elif set(fields) in ({"config"}, {"weights"}):
        assert r.status_code == 400 and "send config and weights" in message
    else:
        expected = next(
            s for cls, s in STATUS.items() if cls in [c.__name__ for c in error.__mro__]
        )
        assert r.status_code == expected, (name, r.status_code, message)
        if (
            body["error"]["code"] != "too_large"
        ):  # else the body cap cut it off, earlier
            assert re.search(pattern, message), (name, message)
    assert store.temp_entries() == []
    assert store.stored() == before
