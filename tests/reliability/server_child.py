"""A `loraplex serve` process for the reliability tests: the real server (registry, pool, API)
on the demo model with the smallest engine, started in a child forked from a forkserver that
has imported the server once, so a start costs a fraction of a second, not an import of torch.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

SMALLEST = {
    "max_loras": 2,
    "max_cpu_loras": 2,
    "max_num_seqs": 4,
    "max_model_len": 64,
    "max_lora_rank": 32,
    "served_model_name": "demo-base",
}


def serve_until_killed(model_dir: Path, data_dir: Path, port: int, started) -> None:
    """Run the server on `port`; set `started` once it listens."""
    import uvicorn

    from loraplex import serve
    from loraplex.serve_settings import ServeSettings

    settings = ServeSettings(
        data_dir=data_dir,
        port=port,
        device="cpu",
        dtype="float32",
        admin_key="admin-key",
        **SMALLEST,
    )
    server = serve.build_server(settings, model_dir, say=lambda _: None)
    runner = uvicorn.Server(
        uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="critical")
    )

    def announce() -> None:
        while not runner.started:
            time.sleep(0.01)
        started.set()

    threading.Thread(target=announce, daemon=True).start()
    runner.run()
