"""Prefix caching through the real server: a cached prefix is never served under another
adapter version, another adapter or another tenant; base-only sharing is the operator's choice.

Expected tokens come from transformers + PEFT on the demo model; `usage.prompt_tokens_details.
cached_tokens` and the /metrics counters show where the cache was (and was not) used.
"""

from __future__ import annotations

import random
import re
import time

import httpx
import pytest
import torch
import transformers
from peft import PeftModel
from server_utils import running_server

ADMIN = {"Authorization": "Bearer admin-key"}
PROMPT_LEN = (
    64  # 4 blocks of 16: a repeat reuses 3 of them (the last token is computed)
)
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def reference(demo_assets):
    """adapter name (None = base) → greedy tokens of transformers + PEFT, one prompt alone."""
    base = transformers.AutoModelForCausalLM.from_pretrained(
        demo_assets.model, dtype=torch.float32
    )
    names = list(demo_assets.adapters)
    model = PeftModel.from_pretrained(
        base, demo_assets.adapter(names[0]), adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(demo_assets.adapter(name), adapter_name=name)
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_assets.model)

    def text(adapter: str | None, prompt: list[int]) -> str:
        ids = torch.tensor([prompt])
        kwargs = {
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": MAX_TOKENS,
            "min_new_tokens": MAX_TOKENS,
            "do_sample": False,
            "eos_token_id": None,
            "pad_token_id": 0,
        }
        with torch.no_grad():
            if adapter is None:
                with model.disable_adapter():
                    out = model.generate(ids, **kwargs)
            else:
                model.set_adapter(adapter)
                out = model.generate(ids, **kwargs)
        return tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)

    return text


WORDS = [
    "who",
    "are",
    "you",
    "and",
    "what",
    "do",
    "you",
    "know",
    "about",
    "the",
    "sea",
    "ships",
    "robots",
    "and",
    "cheese",
]


@pytest.fixture(scope="module")
def new_prompt(demo_assets):
    """seed → a prompt of exactly PROMPT_LEN tokens of plain words (so the replies decode to
    the same text token by token), whose first block differs from every other seed's."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_assets.model)

    def make(seed: int) -> list[int]:
        rng = random.Random(seed)
        words = [f"Q{seed}:"] + [rng.choice(WORDS) for _ in range(PROMPT_LEN)]
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
        assert len(ids) >= PROMPT_LEN
        return ids[:PROMPT_LEN]

    return make


def make_tenants(url: str, *names: str) -> dict[str, dict[str, str]]:
    keys = {}
    for name in names:
        tenant = httpx.post(
            f"{url}/admin/api/tenants", json={"name": name}, headers=ADMIN
        )
        assert tenant.status_code == 201, tenant.text
        issued = httpx.post(
            f"{url}/admin/api/tenants/{tenant.json()['id']}/keys",
            json={},
            headers=ADMIN,
        )
        keys[name] = {"Authorization": f"Bearer {issued.json()['key']}"}
    return keys


def upload(url, headers, name, demo_assets, adapter, replace=False) -> dict:
    directory = demo_assets.adapter(adapter)
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
    data = {"name": name, **({"replace": "true"} if replace else {})}
    response = httpx.post(f"{url}/v1/adapters", data=data, files=files, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def complete(url, headers, model, prompt) -> tuple[str, int]:
    """(text, cached prompt tokens) of one greedy completion."""
    response = httpx.post(
        f"{url}/v1/completions",
        json={
            "model": model,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        },
        headers=headers,
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    return body["choices"][0]["text"], body["usage"]["prompt_tokens_details"][
        "cached_tokens"
    ]


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=ADMIN).text
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if match and all(
            f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()
        ):
            total += float(match.group(2))
    return total


HITS = "vllm:prefix_cache_hits_total"


@pytest.fixture(scope="module")
def server(demo_assets, tmp_path_factory):
    data = tmp_path_factory.mktemp("prefix") / "data"
    options = {"max_loras": 2, "max_cpu_loras": 4, "max_lora_rank": 32}
    with running_server(
        demo_assets.model, data, served_model_name="demo-base", **options
    ) as (
        url,
        _,
    ):
        yield url, make_tenants(url, "acme", "globex")


def test_a_replaced_adapter_never_serves_the_old_versions_cached_kv(
    server, demo_assets, reference, new_prompt
):
    url, keys = server
    acme = keys["acme"]
    prompt = new_prompt(1)
    first = upload(url, acme, "bot", demo_assets, "pirate")
    assert complete(url, acme, "bot", prompt) == (reference("pirate", prompt), 0)
    assert complete(url, acme, "bot", prompt) == (reference("pirate", prompt), 48)
    hits = metric(url, HITS)
    blocks = "loraplex_prefix_cache_blocks"
    assert (
        metric(url, blocks) == 4
    )  # the prompt's 4 full blocks (the first is this one)

    second = upload(url, acme, "bot", demo_assets, "french", replace=True)
    assert second["version"] == 2 and second["sha256"] != first["sha256"]
    # The old version's blocks are unindexed at once (reused first), not left to age out.
    deadline = time.monotonic() + 5
    while metric(url, blocks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, blocks) == 0
    text, cached = complete(url, acme, "bot", prompt)
    assert (text, cached) == (reference("french", prompt), 0)
    assert text != reference("pirate", prompt)
    assert metric(url, HITS) == hits
    # The new version caches for itself.
    assert complete(url, acme, "bot", prompt) == (reference("french", prompt), 48)


def test_two_tenants_with_one_prompt_and_their_own_adapters(
    server, demo_assets, reference, new_prompt
):
    url, keys = server
    upload(url, keys["acme"], "voice", demo_assets, "french")
    upload(
        url, keys["globex"], "voice", demo_assets, "robot"
    )  # same name, other tenant
    prompt = new_prompt(2)
    for _ in range(2):
        assert complete(url, keys["acme"], "voice", prompt)[0] == reference(
            "french", prompt
        )
        assert complete(url, keys["globex"], "voice", prompt)[0] == reference(
            "robot", prompt
        )


def test_same_adapter_content_in_two_tenants_shares_nothing(
    server, demo_assets, reference, new_prompt
):
    url, keys = server
    mine = upload(url, keys["acme"], "twin", demo_assets, "pirate")
    theirs = upload(url, keys["globex"], "twin", demo_assets, "pirate")
    assert mine["sha256"] == theirs["sha256"]
    prompt = new_prompt(3)
    expected = reference("pirate", prompt)
    assert complete(url, keys["acme"], "twin", prompt) == (expected, 0)
    hits = metric(url, HITS)
    assert complete(url, keys["globex"], "twin", prompt) == (expected, 0)
    assert metric(url, HITS) == hits  # no cross-tenant hit
    assert complete(url, keys["globex"], "twin", prompt) == (expected, 48)
    assert metric(url, HITS) == hits + 48


def test_base_prefixes_are_not_shared_across_tenants_by_default(
    server, reference, new_prompt
):
    url, keys = server
    prompt = new_prompt(4)
    expected = reference(None, prompt)
    assert complete(url, keys["acme"], "demo-base", prompt) == (expected, 0)
    assert complete(url, keys["globex"], "demo-base", prompt) == (expected, 0)
    assert complete(url, keys["globex"], "demo-base", prompt) == (expected, 48)
    # Per-tenant share of prompt tokens served from the cache, and the cached blocks.
    ratio = metric(url, "loraplex_tenant_prefix_cache_hit_ratio")
    assert ratio > 0
    assert metric(url, "loraplex_prefix_cache_blocks") > 0
    assert metric(url, "vllm:prefix_cache_queries_total") >= metric(url, HITS) > 0


def test_sharing_base_prefixes_across_tenants_is_a_setting(
    demo_assets, tmp_path, reference, new_prompt
):
    data = tmp_path / "data"
    with running_server(
        demo_assets.model,
        data,
        served_model_name="demo-base",
        max_lora_rank=32,
        share_base_prefix_across_tenants=True,
    ) as (url, _):
        keys = make_tenants(url, "acme", "globex")
        prompt = new_prompt(5)
        expected = reference(None, prompt)
        assert complete(url, keys["acme"], "demo-base", prompt) == (expected, 0)
        assert complete(url, keys["globex"], "demo-base", prompt) == (expected, 48)
        assert metric(url, HITS) == 48
        # Adapters stay per tenant, even with the same content.
        upload(url, keys["acme"], "twin", demo_assets, "robot")
        upload(url, keys["globex"], "twin", demo_assets, "robot")
        assert complete(url, keys["acme"], "twin", prompt)[1] == 0
        assert complete(url, keys["globex"], "twin", prompt)[1] == 0
        assert metric(url, HITS) == 48
