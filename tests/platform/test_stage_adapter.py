"""Engine.stage_adapter / commit_adapter: an adapter written into a free slot from another
thread while the engine thread runs steps for other slots changes nothing for those requests,
and once committed serves exactly what `load_adapter` serves."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from engine_utils import greedy, run_to_completion

from checkpoints import save_random_adapter
from loraplex.adapters_registry import load_adapter_dir
from loraplex.platform import AdapterShapeError, Engine, EngineConfig, EngineThread

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = list(range(3, 17))


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    model = tiny_models["llama2"]
    root = tmp_path_factory.mktemp("stage")
    dirs = {
        "a": save_random_adapter(model, root / "a", 8, ALL, seed=11),
        "b": save_random_adapter(model, root / "b", 16, ALL[:4], seed=12),
        "c": save_random_adapter(model, root / "c", 4, ["q_proj", "v_proj"], seed=13),
    }
    return model, dirs


@pytest.fixture(autouse=True)
def free_engines():
    """Each test's engine goes before the next plans its KV cache from the card's free memory."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def make_engine(model, device: str) -> Engine:
    config = EngineConfig(
        model=str(model), dtype="float32", device=device, max_loras=2, max_lora_rank=16
    )
    return Engine(config)


def weights(engine: Engine, path):
    return load_adapter_dir(path, engine.spec, 16)


def expected_tokens(model, dirs, name: str, max_tokens: int, device: str) -> list[int]:
    """What a fresh engine serves; computed before the test's own engine exists and freed
    after, since on a GPU each engine plans its KV cache from the memory the card has left."""
    engine = make_engine(model, device)
    engine.load_adapter(0, weights(engine, dirs[name]))
    out = run_to_completion(engine, {"x": (PROMPT, greedy(max_tokens), 0)})
    del engine
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out["x"]


def run_on_thread(thread: EngineThread, request_id: str, slot: int, max_tokens: int):
    done, tokens = threading.Event(), []

    def on_output(out):
        tokens.extend(out.new_token_ids)
        if out.finished:
            done.set()

    thread.add_request(request_id, PROMPT, greedy(max_tokens), slot, on_output).result(
        10
    )
    return done, tokens


@pytest.mark.parametrize("device", DEVICES)
def test_staging_beside_running_steps_changes_nothing_for_them(setup, device):
    """On a GPU the A and B copies run on a side stream while the engine's graphs replay."""
    model, dirs = setup
    want_a = expected_tokens(model, dirs, "a", 120, device)
    want_c = expected_tokens(model, dirs, "c", 12, device)
    engine = make_engine(model, device)
    engine.load_adapter(0, weights(engine, dirs["a"]))
    engine.load_adapter(1, weights(engine, dirs["b"]))
    thread = EngineThread(engine).start()
    try:
        done, tokens = run_on_thread(thread, "long", 0, 120)  # adapter a, slot 0
        loaded = [weights(engine, dirs[name]) for name in ("c", "b", "c")]
        for adapter in loaded:  # slot 1 rewritten three times while "long" decodes
            staged = engine.stage_adapter(1, adapter)
            thread.call(lambda e, s=staged: e.commit_adapter(1, s)).result(10)
        assert not done.is_set()  # the writes did overlap its steps
        done_c, tokens_c = run_on_thread(thread, "after", 1, 12)
        assert done.wait(60) and done_c.wait(60)
    finally:
        thread.stop()
    assert tokens == want_a
    assert tokens_c == want_c


@pytest.mark.parametrize("device", DEVICES)
def test_staging_a_slot_in_use_is_refused_and_leaves_it_alone(setup, device):
    model, dirs = setup
    want_a = expected_tokens(model, dirs, "a", 10, device)
    engine = make_engine(model, device)
    engine.load_adapter(0, weights(engine, dirs["a"]))
    engine.add_request("busy", PROMPT, greedy(10), 0)
    engine.step()
    with pytest.raises(AdapterShapeError, match="in use"):
        engine.stage_adapter(0, weights(engine, dirs["c"]))
    while engine.has_unfinished_requests:
        engine.step()
    out = run_to_completion(engine, {"again": (PROMPT, greedy(10), 0)})
    assert out["again"] == want_a
