"""plan_kv_blocks: how many KV-cache blocks fit on the GPU once weights and adapter slots are in.

Startup order is weights, then adapter slots, then this plan, then the KV cache, then the CUDA
graphs. The plan runs one profiling forward of the largest step (the whole token budget, LoRA on
every token) over a small throwaway KV cache to measure the activation peak, then gives the KV
cache what is left of `gpu_memory_utilization` × the card's memory after what is in use now, the
activation peak, the sampler's working set and the graphs' memory pool. Like vLLM, the fraction
covers everything on the card, other processes included, so two engines can share a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

_MiB = 1 << 20
# What the CUDA graphs' pool needs beyond their logits: decode activations are a few MB per
# bucket; the rest is slack for cuBLAS workspaces and the allocator's rounding.
_GRAPH_SLACK_BYTES = 512 * _MiB
# The sampler holds a few [batch, vocab] float32 copies at once (scaled, sorted, softmax, noise).
_SAMPLER_COPIES = 6


@dataclass(frozen=True)
class MemoryPlan:
    """The numbers behind one KV-cache size, in bytes, for the startup log and /metrics."""

    total: int
    in_use: (
        int  # on the card before the KV cache: weights, adapter slots, context, others
    )
    activation_peak: int
    reserved: int  # sampler working set and CUDA-graph pool
    kv_bytes: int
    num_blocks: int

    def describe(self) -> str:
        gib = 1 << 30
        return (
            f"{self.total / gib:.1f} GiB card: {self.in_use / gib:.2f} GiB in use, "
            f"{self.activation_peak / gib:.2f} GiB activation peak, "
            f"{self.reserved / gib:.2f} GiB sampler and graphs, "
            f"{self.kv_bytes / gib:.2f} GiB for {self.num_blocks} KV blocks"
        )


def plan_kv_blocks(
    device: torch.device,
    gpu_memory_utilization: float,
    bytes_per_block: int,
    profile_forward: Callable[[], None],
    *,
    max_num_seqs: int,
    vocab_size: int,
    graph_rows: int,
) -> MemoryPlan:
    """Size the KV cache from what the card has left after one profiling forward.

    :param profile_forward: runs the largest forward the engine will run (allocates what it needs).
    :param graph_rows: the sum over captured graphs of their batch rows (their logits stay live).
    :raises ValueError: nothing is left for even one block.
    """
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    profile_forward()
    torch.cuda.synchronize(device)
    activation_peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free
    logits_row = vocab_size * 4
    reserved = (
        _SAMPLER_COPIES * max_num_seqs * logits_row
        + graph_rows * logits_row
        + _GRAPH_SLACK_BYTES
    )
    kv_bytes = int(total * gpu_memory_utilization) - in_use - activation_peak - reserved
    num_blocks = kv_bytes // bytes_per_block
    plan = MemoryPlan(total, in_use, activation_peak, reserved, kv_bytes, num_blocks)
    if num_blocks < 1:
        raise ValueError(
            f"no GPU memory left for the KV cache at gpu_memory_utilization="
            f"{gpu_memory_utilization}: {plan.describe()}; raise the fraction, lower "
            "max_num_batched_tokens, max_loras or max_num_seqs, or use a smaller model"
        )
    log.info("memory plan: %s", plan.describe())
    return plan
