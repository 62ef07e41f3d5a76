"""`loraplex serve` options: command line > LORAPLEX_* environment > config file > defaults."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from loraplex.cli import build_parser
from loraplex.serve_settings import ServeSettings, load_settings


def test_precedence_cli_over_env_over_file_over_defaults(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text(
        'port = 7000\nmax_loras = 4\nmax_num_seqs = 12\nhost = "0.0.0.0"\n'
    )
    env = {
        "LORAPLEX_PORT": "7100",
        "LORAPLEX_MAX_LORAS": "5",
        "LORAPLEX_CONFIG": str(config),
    }
    settings = load_settings({"port": 7200}, env)
    assert settings.port == 7200  # command line
    assert settings.max_loras == 5  # environment over file
    assert settings.max_num_seqs == 12 and settings.host == "0.0.0.0"  # file
    assert settings.max_lora_rank == ServeSettings().max_lora_rank  # default


def test_yaml_and_json_files_and_their_errors(tmp_path):
    yaml = tmp_path / "s.yaml"
    yaml.write_text("max_cpu_loras: 9\n")
    assert load_settings({"config": yaml}, {}).max_cpu_loras == 9
    bad = tmp_path / "s.json"
    bad.write_text('{"max_lorass": 3}')
    with pytest.raises(ValueError, match="unknown option.*max_lorass"):
        load_settings({"config": bad}, {})
    with pytest.raises(ValueError, match="must end in"):
        load_settings({"config": tmp_path / "s.ini"}, {})
    with pytest.raises(ValidationError):
        load_settings({}, {"LORAPLEX_PORT": "99999"})


def test_admin_key_is_a_secret_and_never_a_flag():
    settings = load_settings({}, {"LORAPLEX_ADMIN_KEY": "s3cret"})
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())
    assert settings.admin_key.get_secret_value() == "s3cret"
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {o for a in serve._actions for o in a.option_strings}
    assert "--admin-key" not in flags
    assert {"--max-loras", "--max-cpu-loras", "--max-upload-bytes", "--config"} <= flags


def test_serve_refuses_bad_options_with_a_reason(capsys):
    from loraplex.cli import main

    assert main(["serve", "--port", "0"]) == 2
    assert "loraplex serve:" in capsys.readouterr().err


def test_serve_sets_the_switch_interval_before_it_runs(monkeypatch):
    import sys
    import types

    from loraplex import serve

    seen = {}

    class Recording:
        def __init__(self, config, state, timeout_s):
            pass

        def run(self):
            seen["interval"] = sys.getswitchinterval()

    settings = load_settings({"switch_interval_ms": 0.5}, {})
    server = types.SimpleNamespace(
        settings=settings,
        app=None,
        state=None,
        close=lambda: seen.setdefault("closed", 1),
    )
    monkeypatch.setattr(serve, "DrainingServer", Recording)
    before = sys.getswitchinterval()
    try:
        serve.run(server)
    finally:
        sys.setswitchinterval(before)
    assert seen == {"interval": pytest.approx(0.0005), "closed": 1}
    with pytest.raises(ValidationError, match="switch_interval_ms"):
        ServeSettings(switch_interval_ms=0)


def test_cpu_threads_default_to_one_beside_a_gpu_only():
    import types

    import torch

    from loraplex.serve import limit_cpu_threads

    before = torch.get_num_threads()
    cuda, cpu = types.SimpleNamespace(type="cuda"), types.SimpleNamespace(type="cpu")
    try:
        limit_cpu_threads(load_settings({}, {}), cpu)
        assert torch.get_num_threads() == before  # a CPU engine keeps torch's default
        limit_cpu_threads(load_settings({}, {}), cuda)
        assert torch.get_num_threads() == 1
        limit_cpu_threads(load_settings({"cpu_threads": 2}, {}), cpu)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
