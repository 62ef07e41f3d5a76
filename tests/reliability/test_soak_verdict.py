"""The soak's verdicts can fail: the flatness rule on synthetic series that grow (and on ones
that only grew during the warm-up), the error and refusal counts, and what the probe reads of
a process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from loraplex.loadgen import RequestRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from soak_probe import GpuMemory, dir_usage, sample_process
from soak_traffic import Tally
from soak_verdict import (
    MIB,
    count_verdict,
    flatness,
    overall,
    resource_verdicts,
    tolerances,
)

GIB = 1 << 30


def series(values, every_s=10.0):
    return [(i * every_s, v) for i, v in enumerate(values)]


def test_a_flat_noisy_series_passes():
    noise = [0, 3, -2, 5, 1, -4, 2, 0, 4, -1] * 9
    rss = series([GIB + n * MIB for n in noise])
    verdict = flatness(rss, warmup_s=0, rel=0.10, abs_=64 * MIB)
    assert verdict["verdict"] == "pass", verdict
    assert abs(verdict["growth"]) <= 9 * MIB


def test_a_steady_leak_fails():
    # 1 GiB + 20 MiB a minute over 30 minutes: +600 MiB, the peaks of the thirds apart.
    rss = series([GIB + i * 20 * MIB / 6 for i in range(181)])
    verdict = flatness(rss, warmup_s=180, rel=0.10, abs_=64 * MIB)
    assert verdict["verdict"] == "fail", verdict
    assert verdict["last_max"] > verdict["limit"]
    assert verdict["slope_per_hour"] == pytest.approx(1200 * MIB, rel=0.01)


def test_a_slow_leak_within_the_tolerance_passes_but_shows_its_slope():
    fds = series([200 + i // 30 for i in range(181)])  # +6 descriptors in 30 min
    verdict = flatness(fds, warmup_s=180, rel=0.10, abs_=8)
    assert verdict["verdict"] == "pass"
    assert verdict["slope_per_hour"] > 0


def test_growth_during_the_warm_up_only_is_not_a_leak():
    filling = [100 + 5 * i for i in range(40)] + [300] * 50  # the host tier fills
    assert flatness(series(filling), 400, 0.10, 0)["verdict"] == "pass"
    assert flatness(series(filling), 0, 0.10, 0)["verdict"] == "fail"


def test_a_step_up_in_the_last_third_fails_and_a_spike_that_returns_passes():
    step = [50] * 60 + [70] * 30
    assert flatness(series(step), 0, 0.10, 8)["verdict"] == "fail"
    spike = [50] * 40 + [70] + [50] * 49  # in the middle third only
    assert flatness(series(spike), 0, 0.10, 8)["verdict"] == "pass"


def test_empty_temp_space_may_hold_an_upload_in_flight_but_not_pile_up():
    rel, abs_ = tolerances(adapter_bytes=84 * MIB)["temp_bytes"]
    one_upload = [0] * 30 + [84 * MIB] + [0] * 30 + [2 * 84 * MIB] + [0] * 28
    assert flatness(series(one_upload), 0, rel, abs_)["verdict"] == "pass"
    piling = [i // 10 * 84 * MIB for i in range(90)]  # one left behind every 10 samples
    assert flatness(series(piling), 0, rel, abs_)["verdict"] == "fail"


def test_too_short_is_inconclusive_and_not_measured_is_not_applicable():
    short = flatness(series([1, 1, 1, 1, 1]), 0, 0.1, 0)
    assert short["verdict"] == "inconclusive"
    assert flatness(series([None] * 50), 0, 0.1, 0)["verdict"] == "n/a"
    assert overall({"a": {"verdict": "pass"}, "gpu": {"verdict": "n/a"}}) == "pass"
    assert (
        overall({"a": {"verdict": "pass"}, "b": {"verdict": "inconclusive"}}) == "fail"
    )


def test_resource_verdicts_find_the_leaking_resource():
    samples = [
        {
            "t": 10.0 * i,
            "rss_bytes": GIB,
            "threads": 40,
            "open_files": 30 + i,  # a file handle per sample, never closed
            "data_bytes": 2 * GIB,
            "data_files": 60,
            "temp_bytes": 0,
            "temp_files": 0,
            "gpu_bytes": None,
        }
        for i in range(90)
    ]
    verdicts = resource_verdicts(samples, warmup_s=60, adapter_bytes=84 * MIB)
    assert verdicts["open_files"]["verdict"] == "fail"
    assert verdicts["gpu_bytes"]["verdict"] == "n/a"
    others = {k: v["verdict"] for k, v in verdicts.items() if k != "open_files"}
    assert set(others.values()) == {"pass", "n/a"}, others
    assert overall(verdicts) == "fail"


def test_counts_fail_above_what_is_allowed():
    assert count_verdict(0, 0, "errors")["verdict"] == "pass"
    assert count_verdict(1, 0, "errors")["verdict"] == "fail"
    assert count_verdict(3, 5, "refusals")["verdict"] == "pass"


def _record(outcome: str, retry_after: str | None = None) -> RequestRecord:
    record = RequestRecord(0, 0, "a", "hot", 0.0, outcome=outcome)
    record.retry_after = retry_after
    return record


def test_a_refusal_needs_retry_after_to_be_told_from_an_error():
    tally = Tally()
    tally.add(_record("ok"))
    tally.add(_record("503", retry_after="2"))
    tally.add(_record("429", retry_after="1"))
    tally.add(_record("503"))  # no Retry-After: a failure
    tally.add(_record("404"))
    tally.add(_record("incomplete"))
    assert tally.ok == 1
    assert dict(tally.refusals) == {"503": 1, "429": 1}
    assert dict(tally.errors) == {"503": 1, "404": 1, "incomplete": 1}
    assert tally.counts()["errors"] == 3 and tally.counts()["refusals"] == 2


def test_the_probe_reads_a_process_and_its_folders(tmp_path):
    data, temp = tmp_path / "data", tmp_path / "temp"
    (data / "adapters").mkdir(parents=True)
    temp.mkdir()
    (data / "adapters" / "w").write_bytes(b"x" * 1000)
    (temp / "spool").write_bytes(b"y" * 10)
    assert dir_usage(data) == (1000, 1)
    sample = sample_process(os.getpid(), data, [temp], GpuMemory(os.getpid()))
    assert sample["rss_bytes"] > 10 * MIB and sample["threads"] >= 1
    assert sample["open_fds"] >= sample["open_files"] >= 3
    assert (sample["data_bytes"], sample["temp_files"]) == (1000, 1)
    assert set(tolerances(1)) <= set(sample)
    with open(tmp_path / "held", "w"):  # one more file handle shows
        assert sample_process(os.getpid(), data, [temp], GpuMemory(1))[
            "open_files"
        ] == (sample["open_files"] + 1)
