"""The `loraplex` command: help that explains, the cached demo, generation with several adapters."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loraplex.cli import build_parser, main
from loraplex.demo import ADAPTERS, BASE_REPLY


def test_help_explains_every_command():
    result = subprocess.run(
        [sys.executable, "-m", "loraplex", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "demo" in result.stdout and "generate" in result.stdout
    for command in ("demo", "generate"):
        sub = build_parser()._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            assert action.help, (
                f"{command} {action.option_strings or action.dest} lacks help"
            )


def test_demo_is_cached(demo_assets, capsys):
    before = {
        p: p.stat().st_mtime_ns for p in demo_assets.root.rglob("*") if p.is_file()
    }
    assert main(["demo", "--out", str(demo_assets.root), "--quiet"]) == 0
    after = {
        p: p.stat().st_mtime_ns for p in demo_assets.root.rglob("*") if p.is_file()
    }
    assert before == after  # nothing rebuilt
    printed = capsys.readouterr().out
    assert str(demo_assets.model) in printed and "pirate" in printed


def test_generate_demo_answers_with_every_adapter_in_one_batch(
    demo_assets, capsys, monkeypatch
):
    monkeypatch.setenv("LORAPLEX_DEMO_DIR", str(demo_assets.root))
    assert main(["generate", "--demo", "--device", "cpu", "Who are you?"]) == 0
    printed = capsys.readouterr().out
    assert f"[base] {BASE_REPLY!r}" in printed
    for adapter in ADAPTERS:
        assert f"[{adapter.name}] {adapter.reply!r}" in printed
    assert "4 requests over 3 adapters in one batch" in printed


def test_generate_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 1
    err = capsys.readouterr().err
    assert "loraplex generate:" in err and "Traceback" not in err
    assert main(["generate", "hi"]) == 2


@pytest.mark.parametrize("flag", ["--max-tokens=0", "--temperature=-1"])
def test_generate_refuses_bad_sampling_values(demo_assets, flag, capsys):
    assert main(["generate", "--model", str(demo_assets.model), flag, "hi"]) == 1
    assert "loraplex generate:" in capsys.readouterr().err
