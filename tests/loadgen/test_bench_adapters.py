"""`loraplex bench adapters` uploads valid adapters that then serve."""

from __future__ import annotations

import httpx

from loraplex.cli import main


def test_cli_uploads_then_skips_existing(bench_server, demo_assets, capsys):
    key = bench_server.keys["acme"]
    args = ["bench", "adapters", "--base-url", bench_server.url, "--api-key", key]
    args += ["--model", str(demo_assets.model), "--count", "3", "--rank", "4"]
    args += ["--prefix", "cli-", "--distinct", "2", "--targets", "q_proj,v_proj"]
    assert main(args) == 0
    assert "3 uploaded, 0 already there, 0 failed" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 uploaded, 3 already there" in capsys.readouterr().out
    headers = {"Authorization": f"Bearer {key}"}
    listed = httpx.get(f"{bench_server.url}/v1/adapters", headers=headers).json()
    mine = {a["name"]: a for a in listed["data"] if a["name"].startswith("cli-")}
    assert set(mine) == {"cli-0", "cli-1", "cli-2"}
    assert mine["cli-0"]["sha256"] == mine["cli-2"]["sha256"] != mine["cli-1"]["sha256"]
    assert all(a["rank"] == 4 and a["targets"] == ["q", "v"] for a in mine.values())
    reply = httpx.post(
        f"{bench_server.url}/v1/completions",
        json={"model": "cli-1", "prompt": "Hi", "max_tokens": 3},
        headers=headers,
    )
    assert reply.status_code == 200, reply.text


def test_cli_refusals(bench_server, demo_assets, tmp_path, capsys):
    base = ["bench", "adapters", "--base-url", bench_server.url, "--api-key"]
    model = ["--model", str(demo_assets.model)]
    wrong = base + ["lpx-wrong"] + model + ["--count", "1"]
    assert main(wrong) == 1
    assert "1 failed (401: 1)" in capsys.readouterr().out
    too_big = base + [bench_server.keys["acme"]] + model + ["--count", "1"]
    assert main(too_big + ["--rank", "64", "--prefix", "big-"]) == 1  # over max rank 16
    assert "422" in capsys.readouterr().out
    assert main(base + ["k", "--model", str(tmp_path), "--count", "1"]) == 2
    assert main(base + ["k"] + model + ["--count", "1", "--targets", "x"]) == 2
