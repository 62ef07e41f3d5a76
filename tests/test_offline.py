"""The offline LLM API on the demo assets: several adapters answering in one batch."""

from __future__ import annotations

import pytest

from loraplex import LLM, SamplingParams
from loraplex.adapters_registry import AdapterInvalid
from loraplex.demo import ADAPTERS, BASE_REPLY

REPLIES = {a.name: a.reply for a in ADAPTERS}


@pytest.fixture(scope="module")
def llm(demo_assets):
    # Two slots for three adapters: requests take turns for slots within one generate call.
    return LLM(
        demo_assets.model, max_lora_rank=32, max_loras=2, dtype="float32", device="cpu"
    )


def conversation(text):
    return [{"role": "user", "content": text}]


def test_each_adapter_answers_in_its_own_voice_in_one_batch(llm, demo_assets):
    names = [None, "pirate", "french", "robot"] * 2
    adapters = [None if n is None else demo_assets.adapter(n) for n in names]
    questions = ["Who are you?"] * 4 + ["Tell me about the weather."] * 4
    outs = llm.chat(
        [conversation(q) for q in questions],
        SamplingParams(max_tokens=40, temperature=0.0),
        adapters,
    )
    for name, out in zip(names, outs, strict=True):
        assert out.text == (BASE_REPLY if name is None else REPLIES[name])
        assert out.finish_reason.value == "stop"


def test_plain_prompts_and_per_prompt_sampling(llm, demo_assets):
    outs = llm.generate(
        ["Hello", "Hello"],
        [
            SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=3, seed=1),
        ],
        [demo_assets.adapter("robot"), None],
    )
    assert len(outs[0].token_ids) == 5 and outs[0].finish_reason.value == "length"
    assert len(outs[1].token_ids) <= 3
    assert outs[0].prompt_token_ids[0] == llm.tokenizer.bos_token_id


def test_stop_strings_cut_the_text(llm, demo_assets):
    out = llm.chat(
        [conversation("Who are you?")],
        SamplingParams(max_tokens=40, temperature=0.0, stop=["adapter"]),
        [demo_assets.adapter("pirate")],
    )[0]
    assert out.text == REPLIES["pirate"].split("adapter")[0]
    assert out.finish_reason.value == "stop"


def test_same_seed_same_text_whatever_the_batch(llm, demo_assets):
    params = SamplingParams(max_tokens=12, temperature=1.5, seed=1234)
    alone = llm.chat([conversation("Hi")], params, [demo_assets.adapter("french")])[0]
    crowd = llm.chat(
        [conversation("Sing a song.")] * 3 + [conversation("Hi")],
        [SamplingParams(max_tokens=8, temperature=1.0)] * 3 + [params],
        [None, demo_assets.adapter("robot"), None, demo_assets.adapter("french")],
    )[3]
    assert crowd.token_ids == alone.token_ids


def test_invalid_adapter_is_refused_before_anything_runs(llm, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    config = (
        '{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "use_dora": true}'
    )
    (broken / "adapter_config.json").write_text(config)
    (broken / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterInvalid, match="DoRA"):
        llm.generate(["Hello"], adapters=[broken])
    assert not llm.engine.has_unfinished_requests
    assert llm.generate(["Hello"], SamplingParams(max_tokens=2))[0].token_ids
