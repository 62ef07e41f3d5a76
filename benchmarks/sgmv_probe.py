"""Runs one SGMV kernel a few times, for a profiler to read (ncu --kernel-name ...).

    PYTHONPATH=src ncu --kernel-name regex:sgmv_shrink --launch-skip 2 --launch-count 1 \\
        python benchmarks/sgmv_probe.py shrink qkv 8192 512
"""

from __future__ import annotations

import sys

import torch

from loraplex.kernels import sgmv
from sgmv_timing import LLAMA_8B, expand, lora_linear, make_inputs, shrink


def main() -> None:
    kernel, name, num_tokens, run = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:5])
    linear = {lin.name: lin for lin in LLAMA_8B}[name]
    n = num_tokens // run
    s = make_inputs(
        linear, [run] * n, [16] * n, 16, torch.bfloat16, torch.device("cuda")
    )
    v = sgmv.lora_shrink(s.x, s.lora_a, s.ranks, s.segments)
    for _ in range(4):
        if kernel == "shrink":
            shrink(s)
        elif kernel == "expand":
            expand(s, v)
        else:
            lora_linear(s, kernel)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
