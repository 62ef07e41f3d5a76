"""probe_load_contention: disk → host of one 8B-shaped adapter, alone and beside a thread busy
in Python (as a server's engine thread is between GPU waits), on the host alone.

    PYTHONPATH=src:tests python benchmarks/probe_load_contention.py --out DIR [--loads 4]

Every torch call lets go of the GIL; a loader that makes many of them waits to take it back
behind the busy thread each time (up to the switch interval, 5 ms). The median of --loads
`AdapterRegistry.load_weights` + `pack` in each setting goes to DIR/probe_load_contention-cpu-<date>.json.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import torch

from loraplex.adapters_registry.packed import pack
from probe_adapter_load import registry_with_8b_adapter, save_probe


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--loads", type=int, default=4)
    args = parser.parse_args(argv)
    registry, adapter_id, weights = registry_with_8b_adapter("probe_load_contention-")

    def loads_ms() -> list[float]:
        out = []
        for _ in range(args.loads):
            started = time.perf_counter()
            pack(registry.load_weights(adapter_id), torch.bfloat16, pin=False)
            out.append(1e3 * (time.perf_counter() - started))
        return out

    alone = loads_ms()
    stop = threading.Event()

    def busy() -> None:
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    try:
        beside = loads_ms()
    finally:
        stop.set()
        thread.join()
    registry.close()
    out = {
        "adapter_bytes": len(weights),
        "alone_ms": alone,
        "beside_busy_thread_ms": beside,
        "alone_median_ms": statistics.median(alone),
        "beside_busy_thread_median_ms": statistics.median(beside),
    }
    save_probe(out, args.out, "probe_load_contention")


if __name__ == "__main__":
    main()
