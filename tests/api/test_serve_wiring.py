"""`loraplex serve` hands its pool and thread options to what it builds."""

from __future__ import annotations

import torch

from loraplex import serve
from loraplex.serve_settings import ServeSettings


def test_adapter_load_workers_and_cpu_threads_reach_the_server(demo_assets, tmp_path):
    settings = ServeSettings(
        data_dir=tmp_path / "data",
        device="cpu",
        dtype="float32",
        admin_key="admin-key",
        adapter_load_workers=3,
        cpu_threads=1,
    )
    before = torch.get_num_threads()
    server = serve.build_server(settings, demo_assets.model, say=lambda _: None)
    try:
        assert server.services.pool.config.load_workers == 3
        assert torch.get_num_threads() == 1
    finally:
        server.close()
        torch.set_num_threads(before)
