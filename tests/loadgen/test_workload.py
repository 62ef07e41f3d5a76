"""The workload is what the options say, drawn from the seed: lengths, popularity, tenants,
cold adapters and arrival times."""

from __future__ import annotations

import itertools
import json
import random
import statistics
from collections import Counter

import pytest

from loraplex.loadgen import (
    LengthDist,
    WorkloadConfig,
    adapter_names,
    generate,
    load_dataset,
    popularity_weights,
)
from loraplex.loadgen.client import RequestRecord
from loraplex.loadgen.report import meets, parse_goodput, stats_ms, summarize


@pytest.mark.parametrize(
    ("spec", "low", "high"),
    [("7", 7, 7), ("fixed:7", 7, 7), ("uniform:3:9", 3, 9), ("normal:20:5", 1, 60)],
)
def test_lengths_stay_in_range(spec, low, high):
    dist = LengthDist.parse(spec)
    rng = random.Random(0)
    values = [dist.sample(rng) for _ in range(2000)]
    assert low <= min(values) and max(values) <= high
    if dist.kind == "normal":
        assert abs(statistics.mean(values) - 20) < 1
    if dist.kind == "uniform":
        assert set(values) == set(range(3, 10))


@pytest.mark.parametrize("spec", ["0", "uniform:9:3", "normal:5", "gauss:1:2", "x"])
def test_bad_lengths_are_refused_with_the_forms(spec):
    with pytest.raises(ValueError, match="length"):
        LengthDist.parse(spec)


def test_popularity_presets_and_zipf():
    assert popularity_weights("uniform", 3) == [1.0, 1.0, 1.0]
    assert popularity_weights("single", 3) == [1.0, 0.0, 0.0]
    assert popularity_weights("skewed", 3) == pytest.approx([1.0, 1 / 2, 1 / 3])
    assert popularity_weights("zipf:2", 3) == pytest.approx([1.0, 1 / 4, 1 / 9])
    for bad in ("zipf:x", "zipf:-1", "hot"):
        with pytest.raises(ValueError, match="popularity"):
            popularity_weights(bad, 3)


def _specs(n=4000, **options):
    return list(generate(WorkloadConfig(base_model="base", **options), n))


def test_zipf_draws_follow_the_weights():
    names = adapter_names("a", 4)
    counts = Counter(
        s.model for s in _specs(adapters=tuple(names), popularity="skewed")
    )
    # Zipf(1): the first adapter twice as often as the second, four times the fourth.
    assert 1.7 < counts["a0"] / counts["a1"] < 2.3
    assert 3.4 < counts["a0"] / counts["a3"] < 4.6


def test_cold_adapters_take_turns_and_the_base_gets_its_share():
    specs = _specs(
        1000,
        adapters=("h0",),
        cold_adapters=("c0", "c1", "c2"),
        cold_share=0.3,
        base_share=0.2,
    )
    kinds = Counter(s.kind for s in specs)
    assert abs(kinds["cold"] - 300) < 60 and abs(kinds["base"] - 200) < 60
    cold = [s.model for s in specs if s.kind == "cold"]
    assert cold[:6] == ["c0", "c1", "c2", "c0", "c1", "c2"]
    assert all(s.model == "base" for s in specs if s.kind == "base")


def test_tenants_by_weight_and_same_seed_same_workload():
    specs = _specs(num_tenants=2, tenant_weights=(3.0, 1.0), vocab_size=50)
    share = sum(s.tenant == 0 for s in specs) / len(specs)
    assert 0.72 < share < 0.78
    again = _specs(num_tenants=2, tenant_weights=(3.0, 1.0), vocab_size=50)
    assert specs == again
    assert all(len(s.prompt) == 32 and max(s.prompt) < 50 for s in specs)
    with pytest.raises(ValueError, match="tenant weights"):
        _specs(num_tenants=3, tenant_weights=(1.0,))


@pytest.mark.parametrize("arrival", ["poisson", "constant"])
def test_arrival_times_have_the_rate(arrival):
    specs = _specs(2001, request_rate=50.0, arrival=arrival)
    gaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(specs)]
    assert statistics.mean(gaps) == pytest.approx(0.02, rel=0.08)
    if arrival == "constant":
        assert max(gaps) - min(gaps) < 1e-9
    else:  # exponential gaps: the deviation equals the mean
        assert statistics.stdev(gaps) == pytest.approx(0.02, rel=0.1)
    assert all(s.arrival_s == 0 for s in _specs(5))  # infinite rate: all at once


def test_dataset_lines_and_their_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [
        {"prompt": "hello there", "output_len": 3},
        {"prompt": [1, 2, 3]},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    entries = load_dataset(path)
    assert [e.output_len for e in entries] == [3, None, 5]
    specs = _specs(50, dataset=(entries[0],), output_len=LengthDist("fixed", 9))
    assert {(s.prompt, s.max_tokens) for s in specs} == {("hello there", 3)}
    chat = _specs(5, dataset=(entries[0],), endpoint="chat")
    assert chat[0].messages == [{"role": "user", "content": "hello there"}]
    path.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="d.jsonl:2"):
        load_dataset(path)
    path.write_text('{"prompt": "a", "messages": []}\n')
    with pytest.raises(ValueError, match="exactly one of"):
        load_dataset(path)


def _record(i, ttft, e2el, tokens, outcome="ok", tenant=0):
    r = RequestRecord(i, tenant, "m", "hot", 0.0, 200, outcome)
    r.ttft_s, r.e2el_s, r.output_tokens, r.prompt_tokens = ttft, e2el, tokens, 10
    if outcome == "ok":
        r.itl_s = [(e2el - ttft) / (tokens - 1)] * (tokens - 1)
    return r


def test_summary_goodput_and_errors_by_outcome():
    records = [_record(i, 0.1 * (i + 1), 1.0 + i, 11) for i in range(4)]
    records += [
        _record(4, None, None, 0, outcome="429", tenant=1),
        _record(5, None, None, 0, outcome="429", tenant=1),
        _record(6, None, None, 0, outcome="connect"),
    ]
    slos = parse_goodput(["ttft:250", "tpot:150"])
    assert slos == {"ttft": 250.0, "tpot": 150.0}
    summary = summarize(records, 2.0, slos)
    assert summary["completed"] == 4 and summary["failed"] == 3
    assert summary["errors"] == {"429": 2, "connect": 1}
    assert summary["request_throughput"] == 2.0
    assert summary["output_throughput"] == 22.0
    assert summary["ttft_ms"]["p50"] == pytest.approx(250.0)
    assert summary["tpot_ms"]["mean"] == pytest.approx(225.0)  # 90, 180, 270, 360
    # ttft 100..400 ms: only the first request meets both SLOs
    assert summary["goodput"]["good_requests"] == 1
    assert summary["by_tenant"]["tenant1"]["errors"] == {"429": 2}
    assert meets(records[0], {"e2el": 1000.0}) and not meets(records[4], {})
    assert stats_ms([])["p99"] is None
    for bad in (["ttft"], ["latency:3"], ["ttft:-1"]):
        with pytest.raises(ValueError, match="goodput"):
            parse_goodput(bad)
