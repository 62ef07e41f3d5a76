"""bench_segment_fill: host time of `LoraSegmentBuffers.fill`, the LoRA segment metadata a graph
step rebuilds whenever its tokens' slots change (every mixed step, and decode steps where
requests join or leave). CPU only: it is host work.

    PYTHONPATH=src python benchmarks/bench_segment_fill.py [--out DIR] [--tag TAG]

Buffers sized as the mixed graphs' (4096 tokens, 64 slots); random slots with a share of
base-only tokens; the median over 200 fills after 20 warm-up fills. JSON to
DIR/segment_fill-cpu-<date>[-TAG].json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import time
from pathlib import Path

from loraplex.kernels.sgmv import LoraSegmentBuffers
from provenance import git_commit

SHAPES = ((64, 8), (256, 64), (1024, 8), (4096, 8))  # (tokens, distinct slots)


def time_fill(num_tokens: int, num_slots: int, fills: int = 200) -> float:
    rng = random.Random(num_tokens * 1000 + num_slots)
    buffers = LoraSegmentBuffers.make(4096, 64, "cpu")
    slots = [rng.randrange(-1, num_slots) for _ in range(num_tokens)]
    for _ in range(20):
        buffers.fill(slots)
    times = []
    for _ in range(fills):
        started = time.perf_counter()
        buffers.fill(slots)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag", default="")
    args = p.parse_args()
    rows = [{"tokens": t, "slots": s, "fill_us": time_fill(t, s)} for t, s in SHAPES]
    for row in rows:
        print(
            f"{row['tokens']:5d} tokens over {row['slots']:2d} slots: {row['fill_us']:7.1f} us"
        )
    date = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"segment_fill-cpu-{date}{'-' + args.tag if args.tag else ''}.json"
    meta = {"date": date, "commit": git_commit()}
    (args.out / name).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
