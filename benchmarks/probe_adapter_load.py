"""probe_adapter_load: what loading one adapter of the Llama-3.1-8B shapes costs the other threads
of a server, on the host alone (no GPU needed).

    PYTHONPATH=src python benchmarks/probe_adapter_load.py --out DIR [--loads 5]

- disk → host (`AdapterRegistry.load_weights`: read, sha256, validation) and `pack`, timed; while
  they run, a thread that sleeps 1 ms at a time records how late it wakes: the longest delay is
  the longest stretch the loads held the GIL, which an engine thread would wait the same way
  (after each GPU sync); the mean is what such a wait costs on average. `--switch-interval-ms`
  sets how long Python lets one thread keep the GIL while another waits (default 5 ms);
- `LoraSlots.write` of the adapter into a slot: wall time and the torch ops it dispatches (each a
  launch or more on a GPU; counted with a TorchDispatchMode, bf16 slots on the CPU).
JSON to DIR/probe_adapter_load-cpu-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench_serve_setup import LLAMA_8B, write_model_dir
from loraplex.adapters_registry import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterRegistry,
    RegistryConfig,
    UploadLimits,
    UploadPart,
)
from loraplex.adapters_registry.packed import pack
from loraplex.loadgen import BaseShapes, random_adapter
from loraplex.platform import ModelSpec
from loraplex.platform.lora_slots import LoraSlots
from provenance import git_commit


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def registry_with_8b_adapter(prefix: str) -> tuple[AdapterRegistry, int, bytes]:
    """A registry in a new temp folder holding one rank-16 adapter of the 8B shapes:
    the registry, the adapter's id and its safetensors bytes."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    model = write_model_dir(root / "model", LLAMA_8B)
    limits = UploadLimits(max_upload_bytes=1 << 34, max_weights_bytes=1 << 34)
    registry = AdapterRegistry(
        RegistryConfig(root / "data", 16, limits), ModelSpec.from_dir(model)
    )
    tenant = registry.tenants.create("t")
    config, weights = random_adapter(BaseShapes.from_model_dir(model), 16, seed=1)
    parts = [
        UploadPart(ADAPTER_CONFIG, io.BytesIO(config)),
        UploadPart(ADAPTER_WEIGHTS, io.BytesIO(weights)),
    ]
    return registry, registry.ingest(tenant.id, "a", parts).id, weights


def save_probe(out: dict, folder: Path, name: str) -> None:
    """Stamp a probe's result with commit and date, write it to
    folder/<name>-cpu-<date>.json and print it."""
    out["meta"] = {"commit": git_commit(), "date": datetime.date.today().isoformat()}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-cpu-{out['meta']['date']}.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "meta"}, indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="sys.setswitchinterval for the run (Python's default: 5 ms)",
    )
    args = parser.parse_args(argv)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    registry, adapter_id, weights = registry_with_8b_adapter("probe_adapter_load-")
    spec = registry.spec

    delays: list[float] = []
    stop = threading.Event()

    def sleeper() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            time.sleep(0.001)
            delays.append(time.perf_counter() - started - 0.001)

    thread = threading.Thread(target=sleeper)
    thread.start()
    time.sleep(0.2)
    idle = list(delays)
    delays.clear()
    load_ms, pack_ms = [], []
    for _ in range(args.loads):
        started = time.perf_counter()
        loaded = registry.load_weights(adapter_id)
        load_ms.append(1e3 * (time.perf_counter() - started))
        started = time.perf_counter()
        pack(loaded, torch.bfloat16, pin=False)
        pack_ms.append(1e3 * (time.perf_counter() - started))
    stop.set()
    thread.join()
    registry.close()

    slots = LoraSlots(spec, 2, 16, torch.bfloat16, torch.device("cpu"))
    writes = []
    for _ in range(3):
        with _CountOps() as ops:
            started = time.perf_counter()
            slots.write(0, loaded)
            writes.append(
                {"ms": 1e3 * (time.perf_counter() - started), "ops": ops.count}
            )
    out = {
        "adapter_bytes": len(weights),
        "load_weights_ms": load_ms,
        "pack_ms": pack_ms,
        "sleeper_idle_max_ms": 1e3 * max(idle),
        "sleeper_during_loads_max_ms": 1e3 * max(delays),
        "sleeper_during_loads_mean_ms": 1e3 * statistics.mean(delays),
        "sleeper_during_loads_p90_ms": 1e3 * statistics.quantiles(delays, n=10)[-1],
        "switch_interval_ms": 1e3 * sys.getswitchinterval(),
        "slot_writes": writes,
    }
    save_probe(out, args.out, "probe_adapter_load")


if __name__ == "__main__":
    sys.exit(main())
