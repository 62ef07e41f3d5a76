"""The official openai client against the server: completions, chat, streaming, models, errors."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from loraplex.demo import ADAPTERS, BASE_REPLY

REPLIES = {a.name: a.reply for a in ADAPTERS}
ASK = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture
def acme(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="key-acme", max_retries=0)


def test_models_lists_the_base_and_the_callers_adapters_only(acme):
    models = {m.id: m for m in acme.models.list().data}
    assert set(models) == {"demo-base", "pirate", "french"}
    assert models["pirate"].parent == "demo-base" and models["demo-base"].parent is None
    assert "/" not in (models["pirate"].root or "")  # never a path


def test_chat_with_an_adapter_and_with_the_base(acme):
    pirate = acme.chat.completions.create(model="pirate", messages=ASK, temperature=0)
    assert pirate.choices[0].message.content == REPLIES["pirate"]
    assert pirate.choices[0].finish_reason == "stop"
    usage = pirate.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 10
    base = acme.chat.completions.create(model="demo-base", messages=ASK, temperature=0)
    assert base.choices[0].message.content == BASE_REPLY


def test_completions_with_logprobs_and_n(acme):
    out = acme.completions.create(
        model="french",
        prompt="Hello",
        max_tokens=4,
        temperature=0.8,
        seed=3,
        n=2,
        logprobs=2,
        extra_body={"top_k": 20, "ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1]
    for choice in out.choices:
        assert len(choice.logprobs.tokens) == 4 == len(choice.logprobs.token_logprobs)
        assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    again = acme.completions.create(
        model="french",
        prompt="Hello",
        max_tokens=4,
        temperature=0.8,
        seed=3,
        n=2,
        extra_body={"top_k": 20, "ignore_eos": True},
    )
    assert [c.text for c in again.choices] == [c.text for c in out.choices]


def test_streaming_chat_with_usage(acme):
    stream = acme.chat.completions.create(
        model="french",
        messages=ASK,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=1,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLIES["french"]
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_raw_sse_ends_with_done(server):
    body = {"model": "demo-base", "prompt": "Hi", "max_tokens": 3, "stream": True}
    headers = {"Authorization": "Bearer key-acme"}
    with httpx.stream(
        "POST", f"{server}/v1/completions", json=body, headers=headers
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_errors_map_to_the_clients_exception_classes(server, acme):
    with pytest.raises(openai.NotFoundError) as missing:
        acme.chat.completions.create(model="nope", messages=ASK)
    with pytest.raises(openai.NotFoundError) as foreign:
        acme.chat.completions.create(model="robot", messages=ASK)  # globex's adapter
    assert missing.value.body["message"].replace("nope", "X") == foreign.value.body[
        "message"
    ].replace("robot", "X")
    bad_key = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        acme.completions.create(model="demo-base", prompt="Hi", max_tokens=400)
    with pytest.raises(openai.BadRequestError, match="n is at most 8"):
        acme.completions.create(model="demo-base", prompt="Hi", n=9)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        acme.completions.create(model="demo-base", prompt="Hi", temperature=5)


def test_concurrent_requests_each_get_their_own_adapter(server):
    async def main():
        acme = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="key-acme")
        globex = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="key-globex")
        plan = [
            (acme, "pirate"),
            (acme, "french"),
            (globex, "robot"),
            (acme, "demo-base"),
        ] * 4
        outs = await asyncio.gather(
            *(
                c.chat.completions.create(model=m, messages=ASK, temperature=0)
                for c, m in plan
            )
        )
        return [
            (m, o.choices[0].message.content)
            for (_, m), o in zip(plan, outs, strict=True)
        ]

    for model, text in asyncio.run(main()):
        assert text == (BASE_REPLY if model == "demo-base" else REPLIES[model])


def test_disconnect_aborts_the_generation_and_releases_the_slot(server, api_state):
    resolver = api_state.resolver
    before = len(resolver.released)
    steps_before = api_state.client.thread.steps
    body = {
        "model": "pirate",
        "prompt": "Hi",
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    headers = {"Authorization": "Bearer key-acme"}
    with httpx.stream(
        "POST", f"{server}/v1/completions", json=body, headers=headers
    ) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        len(resolver.released) == before
        or api_state.client.thread.engine.has_unfinished_requests
    ):
        time.sleep(0.05)
    assert len(resolver.released) == before + 1
    # Aborted within a few steps of the disconnect, not after its 200 tokens.
    assert api_state.client.thread.steps - steps_before < 100
    assert not api_state.client.thread.engine.has_unfinished_requests
    assert api_state.client.num_active == 0


def test_metrics_need_the_admin_key_and_count_requests(server, acme):
    acme.completions.create(model="pirate", prompt="Hi", max_tokens=2)
    assert httpx.get(f"{server}/metrics").status_code == 401
    tenant = httpx.get(
        f"{server}/metrics", headers={"Authorization": "Bearer key-acme"}
    )
    assert tenant.status_code == 403
    text = httpx.get(
        f"{server}/metrics", headers={"Authorization": "Bearer key-admin"}
    ).text
    for series in (
        'vllm:num_requests_running{model_name="demo-base"}',
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
        'vllm:request_success_total{finished_reason="length",model_name="demo-base"}',
        'loraplex_tenant_requests_total{model="pirate",tenant="acme"}',
        "vllm:lora_requests_info{",
        'loraplex_engine_thread_seconds_total{activity="dispatch",model_name="demo-base"}',
    ):
        assert series in text, series
    # The completion above ran at least one prefill step of at least one token.
    prefill = re.search(
        r'loraplex_engine_step_tokens_total\{kind="prefill",model_name="demo-base"\} (\S+)',
        text,
    )
    assert prefill and float(prefill.group(1)) >= 1
    seconds, wait = (
        float(
            re.search(
                rf'{name}\{{kind="prefill",model_name="demo-base"\}} (\S+)', text
            ).group(1)
        )
        for name in (
            "loraplex_engine_step_seconds_total",
            "loraplex_engine_step_gpu_wait_seconds_total",
        )
    )
    assert 0 <= wait < seconds  # the wait is a part of the steps' wall time
    # Where the completion's request waited, by tenant: the engine queue, then its prefill.
    counts = {
        name: float(re.search(rf'{name}_count\{{tenant="acme"\}} (\S+)', text).group(1))
        for name in (
            "loraplex_request_setup_seconds",
            "loraplex_request_queue_time_seconds",
            "loraplex_request_prefill_time_seconds",
            "loraplex_request_delivery_seconds",
        )
    }
    assert all(n >= 1 for n in counts.values()), counts


def test_probes(server):
    assert httpx.get(f"{server}/livez").json() == {"status": "ok"}
    ready = httpx.get(f"{server}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_a_chat_longer_than_the_context_gets_a_400_with_the_numbers(acme):
    long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        acme.chat.completions.create(model="demo-base", messages=long)
