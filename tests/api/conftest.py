"""An API server over the demo model, with an in-memory key table and adapter resolver."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import pytest
import uvicorn
from transformers import AutoTokenizer

from loraplex.adapters_registry import load_adapter_dir
from loraplex.api import (
    ApiConfig,
    ApiState,
    EngineClient,
    Principal,
    TextProcessor,
    create_app,
)
from loraplex.api.metrics import ApiMetrics
from loraplex.platform import Engine, EngineConfig, EngineThread

KEYS = {
    "key-acme": Principal("acme"),
    "key-globex": Principal("globex"),
    "key-admin": Principal(None, is_admin=True),
}
# acme owns pirate and french, globex owns robot
OWNERS = {"pirate": "acme", "french": "acme", "robot": "globex"}


class StaticKeys:
    def authenticate(self, api_key: str):
        return KEYS.get(api_key)


@dataclass
class Lease:
    slot: int
    released: list

    def release(self) -> None:
        self.released.append(self.slot)


class StaticAdapters:
    """Every adapter resident in its own slot; leases recorded to check that all come back."""

    def __init__(self, slots: dict[str, int]):
        self.slots = slots
        self.acquired: list[int] = []
        self.released: list[int] = []

    async def acquire(self, principal, name):
        if name not in self.slots or OWNERS[name] != principal.tenant_id:
            return None
        self.acquired.append(self.slots[name])
        return Lease(self.slots[name], self.released)

    def slot_names(self, slots):
        by_slot = {slot: name for name, slot in self.slots.items()}
        return [by_slot[s] for s in slots]

    def names(self, principal):
        return sorted(n for n, t in OWNERS.items() if t == principal.tenant_id)


@pytest.fixture(scope="session")
def api_state(demo_assets):
    tokenizer = AutoTokenizer.from_pretrained(demo_assets.model)
    config = EngineConfig(
        model=str(demo_assets.model),
        dtype="float32",
        device="cpu",
        max_loras=3,
        max_lora_rank=32,
        max_model_len=256,
        max_num_seqs=32,
    )
    engine = Engine(config, tokenizer=tokenizer.backend_tokenizer)
    slots = {}
    for slot, (name, path) in enumerate(demo_assets.adapters.items()):
        engine.load_adapter(slot, load_adapter_dir(path, engine.spec, 32))
        slots[name] = slot
    thread = EngineThread(engine).start()
    config = ApiConfig(
        served_model_name="demo-base",
        max_model_len=256,
        max_num_seqs=32,
        max_queued_requests=64,
        max_concurrent_per_tenant=48,
    )
    resolver = StaticAdapters(slots)
    metrics = ApiMetrics("demo-base")
    metrics.watch_engine(thread.stats, resolver.slot_names, max_loras=3)
    state = ApiState(
        config=config,
        client=EngineClient(thread),
        text=TextProcessor(tokenizer),
        resolver=resolver,
        authenticator=StaticKeys(),
        metrics=metrics,
    )
    yield state
    thread.stop()


@pytest.fixture(scope="session")
def server(api_state):
    """A real uvicorn server on a free port (the sync openai client needs real HTTP)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        create_app(api_state), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
