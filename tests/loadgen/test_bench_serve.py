"""`loraplex bench serve` against a real server: each arrival mode gives sane figures and no
errors; refusals are counted by status; the CLI explains every option and writes JSON."""

from __future__ import annotations

import json
import math

import pytest

from loraplex.cli import build_parser, main
from loraplex.loadgen import BenchConfig, LengthDist, WorkloadConfig, run_benchmark
from loraplex.loadgen.workload import generate

OUT = 6


def _config(bench_server, num=12, rate=math.inf, arrival="poisson", **options):
    fields = {
        "adapters": ("bench-0", "bench-1", "bench-2"),
        "cold_adapters": ("bench-4", "bench-5"),
        "cold_share": 0.25,
        "base_share": 0.2,
        "popularity": "skewed",
        "prompt_len": LengthDist.parse("uniform:4:12"),
        "output_len": LengthDist("fixed", OUT),
        "vocab_size": 400,
        "request_rate": rate,
        "arrival": arrival,
        "seed": 3,
    }
    workload = WorkloadConfig(**{**fields, **options.pop("workload", {})})
    return BenchConfig(
        bench_server.url,
        (bench_server.keys["acme"],),
        workload,
        num_requests=num,
        progress=False,
        goodput={"ttft": 60_000.0},
        **options,
    )


def _sane(result, num, token_ids=True):
    s = result.summary
    assert s["errors"] == {} and s["completed"] == num, s["errors"]
    assert s["output_tokens"] == num * OUT  # ignore_eos: exactly the asked length
    if token_ids:  # text is tokenized and templated by the server: no exact length
        assert 4 * num <= s["prompt_tokens"] <= 12 * num
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        stats = s[key]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (key, stats)
    assert s["ttft_ms"]["p50"] < s["e2el_ms"]["p50"]
    assert s["e2el_ms"]["p99"] / 1000 <= s["duration_s"]
    assert 0 < s["request_throughput"] <= num / s["e2el_ms"]["p50"] * 1000
    assert s["output_throughput"] == pytest.approx(s["request_throughput"] * OUT)
    assert s["goodput"]["good_requests"] == num
    assert set(s["by_kind"]) <= {"base", "hot", "cold"}
    for record in result.records:
        assert 1 <= len(record.itl_s) <= OUT - 1  # a chunk may carry several tokens
        assert record.prompt_tokens >= 4 and record.status == 200


@pytest.mark.parametrize(
    ("rate", "arrival", "concurrency"),
    [(40.0, "poisson", None), (40.0, "constant", None), (math.inf, "poisson", 3)],
    ids=["poisson", "constant", "concurrency"],
)
def test_each_arrival_mode_gives_sane_figures(bench_server, rate, arrival, concurrency):
    result = run_benchmark(
        _config(bench_server, 12, rate, arrival, max_concurrency=concurrency)
    )
    _sane(result, 12)
    starts = sorted(r.start_s for r in result.records)
    if concurrency is None:
        # Sent at the schedule: never before a request's own arrival time. How late is up to
        # the host (CI's 2 cores also run the server), so only a loose upper bound.
        schedule = {s.index: s.arrival_s for s in generate(result.config.workload, 12)}
        for record in result.records:
            assert record.start_s >= schedule[record.index] - 1e-3
        span = max(schedule.values())
        assert span >= 0.1 and span <= starts[-1] - starts[0] <= span + 5.0
    else:
        in_flight = max(
            sum(r.start_s <= t < r.start_s + r.e2el_s for r in result.records)
            for t in starts
        )
        assert in_flight <= concurrency


def test_chat_with_two_tenants(bench_server):
    config = _config(
        bench_server,
        8,
        workload={"endpoint": "chat", "vocab_size": 0, "num_tenants": 2},
    )
    keys = (bench_server.keys["acme"], bench_server.keys["globex"])
    result = run_benchmark(config.__class__(**{**vars(config), "api_keys": keys}))
    _sane(result, 8, token_ids=False)
    assert set(result.summary["by_tenant"]) == {"tenant0", "tenant1"}


def test_refusals_are_counted_by_status(bench_server):
    config = _config(
        bench_server,
        10,
        workload={
            "adapters": ("bench-0", "no-such-adapter"),
            "popularity": "uniform",
            "base_model": "demo-base",
        },
    )
    bad_key = config.__class__(**{**vars(config), "api_keys": ("lpx-wrong",)})
    summary = run_benchmark(bad_key).summary
    assert summary["errors"] == {"401": 10} and summary["completed"] == 0
    summary = run_benchmark(config).summary
    missing = summary["by_kind"]["hot"]["errors"].get("404", 0)
    assert missing > 0 and summary["errors"] == {"404": missing}
    assert summary["completed"] == 10 - missing


def test_cli_runs_and_writes_json(bench_server, tmp_path, capsys):
    out = tmp_path / "r.json"
    key = bench_server.keys["globex"]
    code = main(
        ["bench", "serve", "--base-url", bench_server.url, "--api-key", key]
        + ["--num-adapters", "3", "--popularity", "zipf:1.2", "--num-requests", "6"]
        + ["--request-rate", "30", "--output-len", "4", "--vocab-size", "300"]
        + ["--goodput", "ttft:60000", "tpot:60000", "--result-json", str(out)]
        + ["--no-progress", "--fail-on-error", "--save-itl"]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "Successful requests:" in printed and "P99 TTFT (ms):" in printed
    saved = json.loads(out.read_text())
    assert saved["summary"]["completed"] == 6
    assert saved["config"]["api_keys"] == 1 and key not in out.read_text()
    assert saved["config"]["workload"]["request_rate"] == 30
    assert len(saved["records"]) == 6 and len(saved["records"][0]["itl_s"]) == 3
    code = main(
        ["bench", "serve", "--api-key", key, "--base-url", bench_server.url]
        + ["--num-requests", "2", "--output-len", "2", "--model", "nope"]
        + ["--no-progress", "--fail-on-error"]
    )
    assert code == 1  # every request refused (404)
    assert main(["bench", "serve", "--api-key", key, "--popularity", "hot"]) == 2
    assert "popularity" in capsys.readouterr().err


def test_help_explains_every_option():
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    commands = bench._subparsers._group_actions[0].choices
    assert set(commands) == {"serve", "adapters"}
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"bench {name} {action.option_strings} lacks help"
    text = commands["serve"].format_help()
    for word in ("Poisson", "goodput", "zipf", "--max-concurrency", "--result-json"):
        assert word in text
