"""Pool exhaustion: with every adapter slot pinned by long streams, a call for a third adapter
waits for a slot and, when none frees in --adapter-wait-timeout, gets 503 with Retry-After;
when a stream ends it is served at once; and under slot churn every answer comes from the
adapter that was asked for."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import IDLE, tenant_with_demo_adapters, wait_idle

from api.server_utils import running_server
from loraplex.demo import ADAPTERS

REPLIES = {a.name: a.reply for a in ADAPTERS}
ASK = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def full_server(demo_assets, tmp_path_factory):
    with running_server(
        demo_assets.model,
        tmp_path_factory.mktemp("full") / "data",
        max_loras=2,
        max_lora_rank=32,
        max_num_seqs=16,
        adapter_wait_timeout=2,
        served_model_name="demo-base",
    ) as (url, server):
        yield url, server, tenant_with_demo_adapters(url, "acme", demo_assets)


def _ask(url, key, model, **options):
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": ASK, "temperature": 0, **options},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


class LongStream:
    """A chat stream of many tokens on `model`, held open until `close()`."""

    def __init__(self, url, key, model):
        self.text, self.first = "", threading.Event()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(url, key, model))
        self.thread.start()
        assert self.first.wait(30), f"no first token on {model}"

    def _run(self, url, key, model):
        body = {"model": model, "messages": ASK, "temperature": 0, "stream": True}
        body |= {"max_tokens": 400, "ignore_eos": True}
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60
        ) as response:
            for line in response.iter_lines():
                if '"content"' in line:
                    self.text += line.split('"content":"', 1)[-1].split('"', 1)[0]
                    self.first.set()
                if self.closed.is_set():
                    return  # drops the connection

    def close(self):
        self.closed.set()
        self.thread.join(30)


def test_every_slot_pinned_then_wait_503_and_never_a_wrong_adapter(full_server):
    url, server, key = full_server
    pirate, french = LongStream(url, key, "pirate"), LongStream(url, key, "french")
    pins = {e.key: e.pins for e in server.services.pool.snapshot() if e.on_device}
    assert len(pins) == 2 and all(pins.values())  # both slots pinned
    started = time.monotonic()
    refused = _ask(url, key, "robot", max_tokens=8)
    waited = time.monotonic() - started
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "pool_exhausted"
    assert int(refused.headers["Retry-After"]) >= 1 and 1.9 < waited < 10
    # A call that waits is served as soon as a stream ends and frees its slot.
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_ask, url, key, "robot")
        time.sleep(0.5)
        assert not waiting.done()
        pirate.close()
        robot = waiting.result(timeout=30)
    assert robot.status_code == 200
    assert robot.json()["choices"][0]["message"]["content"] == REPLIES["robot"]
    # Churn: three adapters through two slots, one of them pinned by the french stream.
    rng = random.Random(3)
    models = [rng.choice(list(REPLIES)) for _ in range(30)]
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda m: (m, _ask(url, key, m)), models))
    served = 0
    for model, answer in answers:
        if answer.status_code == 503:  # waited too long for a slot: retryable
            assert "Retry-After" in answer.headers
            continue
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == REPLIES[model]
        served += 1
    assert served >= 20
    french.close()
    assert pirate.text.startswith(REPLIES["pirate"][:20])
    assert french.text.startswith(REPLIES["french"][:20])
    assert wait_idle(server) == IDLE
