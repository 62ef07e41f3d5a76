"""Where mixed ranks lose time in prefill: the expand's rank step, and the shrink.

In a rank-64 pool every expand program is compiled for its widest rank step, even for the rank-8
tiles that never take it; this times the q/k/v prefill expand (T=8192, runs of 512 tokens,
ranks 8/16/64 in turn) and its uniform-rank runs under rank steps of 16, 32 and 64, each in a
CUDA graph, with the shrink of the same inputs and its error against the torch reference.

    PYTHONPATH=src:benchmarks python benchmarks/sgmv_rank_step_probe.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch

from loraplex.kernels import sgmv
from loraplex.kernels.sgmv.expand import ExpandConfig, choose_expand_config, sgmv_expand
from loraplex.kernels.sgmv.reference import lora_shrink_reference
from sgmv_timing import LLAMA_8B, GraphTimer, make_inputs, shrink

TOKENS, RUN = 8192, 512


def us(timing: dict) -> float:
    return round(timing["per_call_us"], 1)


def shrink_error(s) -> float:
    """Largest relative error of the shrink against the torch reference, over the entries the
    definition owns (columns within each slice's rank)."""
    got = sgmv.lora_shrink(s.x, s.lora_a, s.ranks, s.segments)
    want = lora_shrink_reference(s.x, s.lora_a, s.ranks, s.token_slots)
    max_rank = s.lora_a.shape[1] // s.ranks.shape[1]
    owned = torch.arange(s.lora_a.shape[1], device=got.device) % max_rank
    owned = owned[None, :] < s.ranks[s.token_slots].repeat_interleave(max_rank, dim=1)
    diff = (got - want).abs().where(owned, 0.0).max()
    return float(diff / want.abs().max())


def main() -> None:
    device = torch.device("cuda")
    qkv = {lin.name: lin for lin in LLAMA_8B}["qkv"]
    timer = GraphTimer(device)
    n = TOKENS // RUN
    cases = {"mixed": ([(8, 16, 64)[j % 3] for j in range(n)], 64)}
    cases.update({f"uniform{r}": ([r] * n, r) for r in (8, 16, 64)})
    rows, checks = [], {}
    decode = make_inputs(qkv, [1] * 256, [(8, 16, 64)[j % 3] for j in range(256)], 64,
                         torch.bfloat16, device)  # fmt: skip
    checks["decode_mixed"] = shrink_error(decode)
    for name, (ranks, max_rank) in cases.items():
        s = make_inputs(qkv, [RUN] * n, ranks, max_rank, torch.bfloat16, device)
        checks[name] = shrink_error(s)
        v = sgmv.lora_shrink(s.x, s.lora_a, s.ranks, s.segments)
        row = {
            "case": name,
            "shrink_us": us(timer.per_call([lambda s=s: shrink(s)] * 8)),
        }
        block_n = choose_expand_config(64, torch.bfloat16).block_n
        for block_r in (16, 32, 64):
            if block_r > max(16, max_rank):
                continue
            cfg = ExpandConfig(block_n, block_r)

            def call(s=s, v=v, cfg=cfg):
                sgmv_expand(
                    s.y, v, s.lora_b, s.ranks, s.scales, s.linear.offsets, s.segments,
                    config=cfg,
                )  # fmt: skip

            row[f"expand_r{block_r}_us"] = us(timer.per_call([call] * 8))
        rows.append(row)
        print(row, flush=True)
    with open(sys.argv[1], "w") as f:
        card = torch.cuda.get_device_name()
        json.dump({"card": card, "shrink_errors": checks, "rows": rows}, f, indent=1)
    print("shrink max rel err vs torch:", checks)


if __name__ == "__main__":
    main()
