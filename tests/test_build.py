"""`loraplex build` and the engine directory: build → load round trip without re-quantizing,
the limits an engine fixes, refusals of damaged or foreign engine directories, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from loraplex.cli import build_parser, main
from loraplex.kernels import fp8
from loraplex.platform import Engine, EngineConfig, ModelLoadError, SamplingParams
from loraplex.platform import engine_dir as engine_dir_module
from loraplex.platform.engine_build import (
    GATE_PROMPTS,
    GATE_TOKENS,
    BuildOptions,
    build_engine,
    gate_prompts,
    prompt_logits,
)
from loraplex.platform.engine_dir import ENGINE_JSON, FORMAT_VERSION, open_engine_dir

DOCS = Path(__file__).resolve().parents[1] / "docs"
ARCH = "llama-tied-bias"


@pytest.fixture(scope="module")
def built(tiny_models, tmp_path_factory):
    """(checkpoint, engine directory, engine.json record) of one CPU build."""
    out = tmp_path_factory.mktemp("build") / "engine"
    options = BuildOptions(
        model=tiny_models[ARCH],
        out=out,
        max_num_seqs=8,
        max_model_len=128,
        max_lora_rank=16,
        device="cpu",
        progress=False,
    )
    return tiny_models[ARCH], out, build_engine(options)


def _copy(engine: Path, tmp_path: Path) -> Path:
    target = tmp_path / "engine-copy"
    shutil.copytree(engine, target)
    return target


def _edit_record(engine: Path, **changes) -> None:
    record = json.loads((engine / ENGINE_JSON).read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            record[section][field] = value
        else:
            record[section] = value
    (engine / ENGINE_JSON).write_text(json.dumps(record))


def test_engine_json_records_config_gpu_and_a_sane_quality_gate(built):
    checkpoint, engine, record = built
    on_disk = json.loads((engine / ENGINE_JSON).read_text())
    assert on_disk["format_version"] == FORMAT_VERSION
    assert on_disk["engine"] == {
        "quantization": "fp8",
        "dtype": "float32",
        "max_num_seqs": 8,
        "max_model_len": 128,
        "max_lora_rank": 16,
    }
    gpu = on_disk["gpu"]
    assert gpu["device_type"] == "cpu" and gpu["capability"] is None
    assert gpu["torch"] == torch.__version__ and "triton" in gpu
    assert on_disk["built_at"].startswith("20")
    gate = on_disk["quality_gate"]
    assert gate["positions"] == GATE_PROMPTS * GATE_TOKENS
    assert 0.9 <= gate["top1_agreement"] <= 1.0
    assert 0.0 <= gate["mean_kl"] <= gate["max_kl"] < 1e-3
    assert gate == record["quality_gate"]
    assert (engine / "config.json").read_bytes() == (
        checkpoint / "config.json"
    ).read_bytes()
    files = sorted(p.name for p in engine.iterdir())
    assert "model.safetensors" not in files  # the checkpoint's weights are not copied
    assert [w["file"] for w in on_disk["weights"]] == [
        f for f in files if f.startswith("weights-")
    ]
    assert not list(engine.parent.glob(".engine.building-*"))


def test_the_engine_loads_without_quantizing_and_computes_what_quantizing_at_load_does(
    built, monkeypatch
):
    checkpoint, engine, _ = built

    def refuse(_weight):
        raise AssertionError("an engine directory must not be quantized again")

    at_load_fp8 = Engine(
        EngineConfig(
            model=str(checkpoint), device="cpu", quantization="fp8", max_loras=0
        )
    )
    monkeypatch.setattr(fp8, "quantize_weight", refuse)
    loaded = Engine(EngineConfig(model=str(engine), device="cpu", max_loras=2))
    assert loaded.built is not None
    assert loaded.config.quantization == "fp8" and loaded.config.max_num_seqs == 8
    assert loaded.max_model_len == 128 and loaded.config.max_lora_rank == 16
    prompts = gate_prompts(loaded.spec.vocab_size, 32)
    ours = prompt_logits(loaded.model, prompts)
    for a, b in zip(ours, prompt_logits(at_load_fp8.model, prompts), strict=True):
        assert torch.equal(a, b)
    assert "top-1 agreement" in loaded.built.summary()


def test_an_engine_directory_splits_over_two_ranks(built):
    """A one-GPU build served by 2 tensor-parallel ranks (gloo): each rank cuts its shard of
    the stored FP8 weights and scales (rows of q/k/v with their biases, columns of o) and the
    greedy tokens are those of one rank."""
    _, engine_dir, _ = built
    prompts = gate_prompts(256, 20)[:3]
    tokens = {}
    for size in (1, 2):
        engine = Engine(
            EngineConfig(
                model=str(engine_dir),
                device="cpu",
                max_loras=0,
                tensor_parallel_size=size,
            )
        )
        try:
            assert engine.config.quantization == "fp8"
            params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
            for i, prompt in enumerate(prompts):
                engine.add_request(f"r{i}", prompt, params)
            got: dict[str, list[int]] = {}
            while engine.has_unfinished_requests:
                for out in engine.step():
                    got.setdefault(out.request_id, []).extend(out.new_token_ids)
            tokens[size] = got
        finally:
            engine.close()
    assert tokens[2] == tokens[1]
    assert all(len(t) == 8 for t in tokens[1].values())


def test_serving_limits_come_from_the_engine_and_may_only_go_down(built):
    _, engine, _ = built
    lower = Engine(
        EngineConfig(
            model=str(engine),
            device="cpu",
            max_num_seqs=4,
            max_lora_rank=8,
            max_loras=1,
        )
    )
    assert (lower.config.max_num_seqs, lower.config.max_lora_rank) == (4, 8)
    for options, match in (
        ({"max_num_seqs": 9}, "max_num_seqs=9 exceeds the 8"),
        ({"max_model_len": 256}, "max_model_len=256 exceeds the 128"),
        ({"max_lora_rank": 32}, "rebuild with --max-lora-rank 32"),
        ({"dtype": "bfloat16"}, "built with dtype=float32"),
        ({"load_format": "dummy"}, "engine directory"),
    ):
        with pytest.raises(ModelLoadError, match=match):
            Engine(EngineConfig(model=str(engine), device="cpu", **options))


@pytest.mark.parametrize(
    "damage, match",
    [
        ("missing weights", "lacks weights-00001-of-00001.safetensors"),
        ("truncated weights", "bytes, not the"),
        ("missing config", "lacks config.json"),
        ("corrupt json", "is not valid JSON"),
        ("no record", "lacks engine, gpu"),
        ("other version", "format version 99"),
        ("other gpu", r"built for NVIDIA H100 80GB HBM3 \(sm_90\).*rebuild it here"),
        ("other tensor", "this model lacks"),
    ],
)
def test_damaged_or_foreign_engines_are_refused_with_the_reason(
    built, tmp_path, damage, match
):
    _, engine, _ = built
    engine = _copy(engine, tmp_path)
    weights = engine / "weights-00001-of-00001.safetensors"
    if damage == "missing weights":
        weights.unlink()
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif damage == "missing config":
        (engine / "config.json").unlink()
    elif damage == "corrupt json":
        (engine / ENGINE_JSON).write_text('{"format_version": 1, "engine": ')
    elif damage == "no record":
        (engine / ENGINE_JSON).write_text('{"format_version": 1}')
    elif damage == "other version":
        _edit_record(engine, format_version=99)
    elif damage == "other gpu":
        gpu = {
            "device_type": "cuda",
            "name": "NVIDIA H100 80GB HBM3",
            "capability": [9, 0],
        }
        _edit_record(engine, gpu=gpu)
    elif damage == "other tensor":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        tensors["layers.0.mlp.extra"] = torch.zeros(2)
        save_file(tensors, str(weights))
        record = json.loads((engine / ENGINE_JSON).read_text())
        record["weights"][0]["bytes"] = weights.stat().st_size
        (engine / ENGINE_JSON).write_text(json.dumps(record))
    with pytest.raises(ModelLoadError, match=match):
        Engine(EngineConfig(model=str(engine), device="cpu", max_loras=0))


def test_a_checkpoint_directory_is_not_an_engine(tiny_models):
    assert open_engine_dir(tiny_models[ARCH]) is None


def test_build_is_atomic_and_never_overwrites(tiny_models, tmp_path, monkeypatch):
    out = tmp_path / "engine"
    out.mkdir()
    with pytest.raises(FileExistsError):
        build_engine(BuildOptions(tiny_models[ARCH], out, device="cpu", progress=False))
    out.rmdir()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(engine_dir_module, "_write_shards", disk_full)
    with pytest.raises(OSError, match="No space"):
        build_engine(BuildOptions(tiny_models[ARCH], out, device="cpu", progress=False))
    assert list(tmp_path.iterdir()) == []  # neither the engine nor its temporary twin


def test_build_help_and_every_build_option_in_api_md(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    text = capsys.readouterr().out
    api_md = (DOCS / "api.md").read_text()
    build = build_parser()._subparsers._group_actions[0].choices["build"]
    for action in build._actions:
        assert action.help, action.option_strings
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert flag in text and f"`{flag}`" in api_md, flag


def test_cli_builds_the_tiny_model_end_to_end(tiny_models, tmp_path, capsys):
    out = tmp_path / "engine"
    args = ["build", str(tiny_models["llama2"]), "--out", str(out), "--device", "cpu"]
    assert main([*args, "--max-num-seqs", "4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"engine written to {out}" in printed and "top-1 agreement" in printed
    assert json.loads((out / ENGINE_JSON).read_text())["engine"]["max_num_seqs"] == 4
    assert main([*args, "--quiet"]) == 1  # exists now
    assert "loraplex build:" in capsys.readouterr().err
    assert main(["build", str(out), "--out", str(tmp_path / "again"), "--quiet"]) == 1
    assert "is an engine already" in capsys.readouterr().err


def test_serve_settings_take_quantization():
    from loraplex.serve_settings import load_settings

    assert load_settings({"quantization": "fp8"}, {}).quantization == "fp8"
    assert load_settings({}, {"LORAPLEX_QUANTIZATION": "fp8"}).quantization == "fp8"
    assert load_settings({}, {}).quantization == "none"
    with pytest.raises(ValueError):
        load_settings({"quantization": "int4"}, {})


@pytest.mark.gpu
def test_gpu_build_records_the_card_and_serves_what_quantizing_at_load_serves(
    tiny_models, tmp_path
):
    from loraplex.platform import SamplingParams

    def run_to_completion(engine, requests):
        for request_id, (prompt, params, slot) in requests.items():
            engine.add_request(request_id, prompt, params, slot)
        tokens = {request_id: [] for request_id in requests}
        while engine.has_unfinished_requests:
            for out in engine.step():
                tokens[out.request_id].extend(out.new_token_ids)
        return tokens

    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    checkpoint, out = tiny_models["llama3.1"], tmp_path / "engine"
    options = BuildOptions(
        checkpoint, out, dtype="bfloat16", device="cuda", max_num_seqs=8, progress=False
    )
    gpu = build_engine(options)["gpu"]
    assert gpu["capability"] == list(torch.cuda.get_device_capability())
    assert gpu["name"] == torch.cuda.get_device_name() and gpu["cuda"]
    gen = torch.Generator().manual_seed(4)
    requests = {
        f"r{i}": (torch.randint(0, 256, (n,), generator=gen).tolist(), greedy, None)
        for i, n in enumerate([3, 40, 200, 7])
    }
    # Two engines in one process: explicit KV sizes, or the first plans 90% of the card for
    # itself and the second finds nothing left (the memory plan counts the whole card).
    loaded = Engine(
        EngineConfig(model=str(out), device="cuda", max_loras=0, num_kv_blocks=256)
    )
    assert loaded.dtype == torch.bfloat16 and loaded.config.max_num_seqs == 8
    at_load = Engine(
        EngineConfig(
            model=str(checkpoint),
            device="cuda",
            dtype="bfloat16",
            quantization="fp8",
            max_num_seqs=8,
            max_loras=0,
            num_kv_blocks=256,
        )
    )
    assert run_to_completion(loaded, requests) == run_to_completion(at_load, requests)
