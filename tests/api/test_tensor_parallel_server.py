"""`loraplex serve --tensor-parallel-size 2` on the CPU (gloo): the demo adapters answer what one
rank answers, and a killed worker turns the server not ready with the one error shape, never a
hang."""

from __future__ import annotations

import os
import signal
import time

import httpx

from api.server_utils import running_server
from reliability.helpers import tenant_with_demo_adapters

PROMPT = "Tell me about the sea and the ships"


def answers(url: str, key: str, models: list[str]) -> dict[str, str]:
    out = {}
    for model in models:
        response = httpx.post(
            f"{url}/v1/completions",
            json={"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        out[model] = response.json()["choices"][0]["text"]
    return out


def test_two_ranks_serve_the_demo_and_a_dead_worker_makes_it_not_ready(
    demo_assets, tmp_path
):
    models = ["demo-base", *demo_assets.adapters]
    texts = {}
    for size in (1, 2):
        with running_server(
            demo_assets.model,
            tmp_path / f"data{size}",
            served_model_name="demo-base",
            max_loras=3,
            max_lora_rank=32,
            tensor_parallel_size=size,
        ) as (url, server):
            key = tenant_with_demo_adapters(url, "t", demo_assets)
            texts[size] = answers(url, key, models)
            if size == 1:
                continue
            assert httpx.get(f"{url}/readyz").status_code == 200
            worker = server.engine_thread.engine.workers.processes[0]
            os.kill(worker.pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if httpx.get(f"{url}/readyz").status_code == 503:
                    break
                # Steps are what notice the loss: keep the engine busy.
                httpx.post(
                    f"{url}/v1/completions",
                    json={"model": "demo-base", "prompt": PROMPT, "max_tokens": 4},
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=60,
                )
            assert httpx.get(f"{url}/readyz").status_code == 503
            refused = httpx.post(
                f"{url}/v1/completions",
                json={"model": "demo-base", "prompt": PROMPT, "max_tokens": 4},
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )
            assert refused.status_code == 503, refused.text
            assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
            assert "Traceback" not in refused.text
    assert texts[2] == texts[1]
    assert len(set(texts[1].values())) == len(models)  # the adapters matter
