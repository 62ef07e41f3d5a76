"""The pool driving the real CPU engine on its thread, with the demo's three adapters.

One engine slot and one host slot, so every switch of adapter evicts from both tiers and the
next use reads the adapter from disk again.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from registry_files import read_files
from transformers import AutoTokenizer

from loraplex.adapters_registry import (
    AdapterRegistry,
    EngineThreadSlotWriter,
    PoolConfig,
    PoolExhausted,
    RegistryConfig,
)
from loraplex.demo import ADAPTERS
from loraplex.platform import (
    AdapterShapeError,
    Engine,
    EngineConfig,
    EngineThread,
    ModelSpec,
    SamplingParams,
)

REPLIES = {a.name: a.reply for a in ADAPTERS}
_ids = itertools.count()


class Served:
    def __init__(self, demo_assets, data_dir) -> None:
        model = demo_assets.model
        self.registry = AdapterRegistry(
            RegistryConfig(data_dir=data_dir, max_lora_rank=32),
            ModelSpec.from_dir(model),
        )
        tenant = self.registry.tenants.create("demo")
        self.ids = {
            name: self.registry.ingest(
                tenant.id, name, read_files(demo_assets.adapter(name)).parts()
            ).id
            for name in REPLIES
        }
        tokenizer = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Who are you?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        self.prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        config = EngineConfig(
            model=str(model),
            dtype="float32",
            device="cpu",
            max_loras=1,
            max_lora_rank=32,
        )
        engine = Engine(config, tokenizer=tokenizer.backend_tokenizer)
        self.thread = EngineThread(engine).start()
        self.writer = EngineThreadSlotWriter(self.thread)
        self.pool = self.registry.make_pool(
            PoolConfig(max_loras=1, max_cpu_loras=1, acquire_timeout_s=30), self.writer
        )

    def start(self, slot: int, max_tokens: int = 40):
        """Submit a greedy request (EOS ignored); returns (finished event, outputs)."""
        done, outputs = threading.Event(), []

        def on_output(out):
            outputs.append(out)
            if out.finished:
                done.set()

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.thread.add_request(
            f"r{next(_ids)}", self.prompt, params, slot, on_output
        ).result(10)
        return done, outputs

    def run(self, name: str, max_tokens: int = 40) -> tuple[list[int], str]:
        key = self.ids[name]
        slot = self.pool.acquire(key)
        try:
            done, outputs = self.start(slot, max_tokens)
            assert done.wait(60)
        finally:
            self.pool.release(key)
        return [t for o in outputs for t in o.new_token_ids], "".join(
            o.text_delta for o in outputs
        )

    def close(self) -> None:
        self.pool.close()
        self.thread.stop()
        self.registry.close()


@pytest.fixture(scope="module")
def served(demo_assets, tmp_path_factory):
    s = Served(demo_assets, tmp_path_factory.mktemp("served") / "data")
    yield s
    s.close()


def test_after_eviction_and_reload_an_adapter_gives_exactly_its_earlier_outputs(served):
    before = served.pool.metrics.snapshot()["loads"].get("disk_to_host", 0)
    first, text = served.run("pirate")
    assert text.startswith(REPLIES["pirate"])
    french, french_text = served.run("french")  # evicts pirate from both tiers
    assert french_text.startswith(REPLIES["french"]) and french != first
    again, _ = served.run("pirate")  # read from disk again, into the same slot
    assert again == first
    m = served.pool.metrics.snapshot()
    assert m["loads"]["disk_to_host"] - before == 3
    assert m["evictions"]["device"] >= 2 and m["evictions"]["host"] >= 2
    kinds = [e.kind for e in served.registry.catalog.events(served.ids["pirate"])]
    assert kinds.count("loaded") >= 2 and "evicted" in kinds


def test_a_slot_is_not_reused_while_a_running_request_holds_it(served):
    robot_alone, _ = served.run("robot", max_tokens=400)
    french_alone, _ = served.run("french")
    robot = served.ids["robot"]
    slot = served.pool.acquire(robot)
    done, outputs = served.start(slot, max_tokens=400)
    french_weights = served.registry.load_weights(served.ids["french"])

    def write_behind_the_pools_back(engine):  # runs between two engine steps
        if not engine.has_unfinished_requests:
            return "robot finished already"
        try:
            engine.load_adapter(slot, french_weights)
        except AdapterShapeError as exc:
            return str(exc)
        return "written"

    # Even a write that skipped the pool is refused by the engine while robot runs.
    outcome = served.thread.call(write_behind_the_pools_back).result(10)
    assert "is in use by 1 unfinished request" in outcome or "finished" in outcome
    waiting: dict = {}

    def french_request():
        waiting["result"] = served.run("french")

    waiter = threading.Thread(target=french_request)
    waiter.start()
    with pytest.raises(PoolExhausted):
        served.pool.acquire(served.ids["french"], timeout=0.05)
    assert done.wait(60)
    time.sleep(0.1)
    assert waiter.is_alive() and "result" not in waiting  # still waiting for the slot
    served.pool.release(robot)
    waiter.join(60)
    assert [t for o in outputs for t in o.new_token_ids] == robot_alone
    assert waiting["result"][0] == french_alone
