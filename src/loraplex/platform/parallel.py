"""TensorParallel: this process's rank in a tensor-parallel group, its shard of each weight, and
the collectives the model calls.

Megatron's split: q/k/v and gate/up are column-parallel (each rank computes a slice of the
outputs: its query heads, its KV heads, its share of the MLP's intermediate), o and down are
row-parallel (each rank holds the matching slice of the inputs and the partial sums are
all-reduced), the embedding and the LM head are split by vocabulary rows. When there are fewer
KV heads than ranks, each KV head is replicated on the ranks whose query heads use it.

With a world size of 1 (`SINGLE`) every shard is the whole tensor and every collective is a
no-op, so the one-GPU engine runs exactly the code it always ran.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .config import ModelSpec
from .errors import ModelLoadError

# Adapter targets whose output features are split (column-parallel) and whose input features
# are split (row-parallel).
COLUMN_TARGETS = ("q", "k", "v", "gate", "up")
ROW_TARGETS = ("o", "down")


@dataclass(frozen=True)
class TensorParallel:
    """Rank `rank` of `world_size`; `group` is the torch.distributed group of the model's
    collectives (NCCL on GPUs, gloo on CPUs), `control` a gloo group for host-side messages
    (the step each rank runs, adapter shards); both None for a world of one."""

    rank: int = 0
    world_size: int = 1
    group: Any = None
    control: Any = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place; returns it."""
        if self.enabled:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's `value` (host ints; over the control group)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.control)
        return int(tensor.item())

    def all_gather_columns(self, tensor: torch.Tensor) -> torch.Tensor:
        """[T, C] on every rank → [T, world_size * C], rank 0's columns first."""
        if not self.enabled:
            return tensor
        rows, columns = tensor.shape
        gathered = torch.empty(
            (self.world_size * rows, columns), dtype=tensor.dtype, device=tensor.device
        )
        _all_gather_single(gathered, tensor.contiguous(), group=self.group)
        return (
            gathered.view(self.world_size, rows, columns)
            .permute(1, 0, 2)
            .reshape(rows, self.world_size * columns)
        )

    def even_split(self, size: int) -> slice:
        """This rank's part of `size` items split evenly (the caller checked divisibility)."""
        part = size // self.world_size
        return slice(self.rank * part, (self.rank + 1) * part)

    def vocab_rows(self, vocab_size: int) -> tuple[slice, int]:
        """(the vocabulary rows this rank holds, the padded rows per rank).

        Every rank holds ceil(vocab / world) rows so that gathered logits line up; the last
        rank's padding rows are zeros and are cut from the logits."""
        per_rank = math.ceil(vocab_size / self.world_size)
        start = min(self.rank * per_rank, vocab_size)
        return slice(start, min(start + per_rank, vocab_size)), per_rank

    def head_rows(self, spec: ModelSpec, target: str) -> slice:
        """Rows of a q, k or v weight [heads * head_dim, in] that this rank computes."""
        if target == "q":
            heads = self.even_split(spec.num_heads)
        else:
            first = self.kv_head_start(spec)
            heads = slice(first, first + local_kv_heads(spec, self.world_size))
        return slice(heads.start * spec.head_dim, heads.stop * spec.head_dim)

    def kv_head_start(self, spec: ModelSpec) -> int:
        if spec.num_kv_heads >= self.world_size:
            return self.even_split(spec.num_kv_heads).start
        # Replicated: the KV head of this rank's first query head.
        first_q = self.even_split(spec.num_heads).start
        return first_q // (spec.num_heads // spec.num_kv_heads)

    def weight_shard(
        self, spec: ModelSpec, target: str
    ) -> tuple[slice | None, slice | None]:
        """(rows, columns) of a full target weight [out, in] that this rank holds; None = all.

        Adapters follow the same split: A [r, in] takes the columns, B [out, r] the rows."""
        if not self.enabled:
            return None, None
        if target in ("q", "k", "v"):
            return self.head_rows(spec, target), None
        if target in ("gate", "up"):
            return self.even_split(spec.intermediate_size), None
        if target == "o":
            return None, self.head_rows(spec, "q")
        if target == "down":
            return None, self.even_split(spec.intermediate_size)
        raise ValueError(f"unknown target {target!r}")


SINGLE = TensorParallel()
# torch 2.13 renamed all_gather_into_tensor (and warns on the old name); 2.11 has only the old.
_all_gather_single = (
    getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
)


def local_kv_heads(spec: ModelSpec, world_size: int) -> int:
    return max(1, spec.num_kv_heads // world_size)


def check_shardable(spec: ModelSpec, world_size: int) -> None:
    """Raise ModelLoadError naming the size that does not split over `world_size` ranks."""
    if world_size < 1:
        raise ModelLoadError(f"tensor_parallel_size must be >= 1, not {world_size}")
    sizes = {
        "num_attention_heads": spec.num_heads,
        "intermediate_size": spec.intermediate_size,
    }
    for name, size in sizes.items():
        if size % world_size:
            raise ModelLoadError(
                f"{name} ({size}) is not divisible by tensor_parallel_size ({world_size})"
            )
    kv = spec.num_kv_heads
    if kv % world_size and world_size % kv:
        raise ModelLoadError(
            f"num_key_value_heads ({kv}) and tensor_parallel_size ({world_size}) must "
            "divide one another"
        )


def shard_spec(spec: ModelSpec, tp: TensorParallel) -> ModelSpec:
    """The sizes one rank computes: its query and KV heads and its share of the MLP."""
    if not tp.enabled:
        return spec
    check_shardable(spec, tp.world_size)
    return dataclasses.replace(
        spec,
        num_heads=spec.num_heads // tp.world_size,
        num_kv_heads=local_kv_heads(spec, tp.world_size),
        intermediate_size=spec.intermediate_size // tp.world_size,
    )


def take_shard(
    tensor: torch.Tensor, rows: slice | None, columns: slice | None
) -> torch.Tensor:
    """tensor[rows, columns] for a 2-D tensor (a 1-D bias takes the rows only)."""
    if rows is not None:
        tensor = tensor[rows]
    if columns is not None and tensor.dim() == 2:
        tensor = tensor[:, columns]
    return tensor


def join(
    rank: int, world_size: int, port: int, device: torch.device, timeout_s: float
) -> TensorParallel:
    """Join the tensor-parallel group of `world_size` processes that meet at localhost:`port`.

    NCCL carries the model's collectives on GPUs, gloo on CPUs; a gloo group carries the host
    messages in both cases. A peer that does not arrive within `timeout_s` is an error.
    """
    timeout = timedelta(seconds=timeout_s)
    cuda = device.type == "cuda"
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device if cuda else None,
    )
    # Workers wait on the control group for as long as the server is idle.
    control = dist.new_group(backend="gloo", timeout=timedelta(days=365))
    return TensorParallel(rank, world_size, dist.group.WORLD, control)


def leave(tp: TensorParallel | None = None) -> None:
    """Leave the group joined by `join` (a no-op when there is none).

    NCCL's orderly teardown waits for every peer and was seen to hang when ranks left one by
    one, so an NCCL group is aborted (ncclCommAbort: local, immediate) after the gloo control
    group is destroyed; a gloo-only group is destroyed.
    """
    if not dist.is_initialized():
        return
    if dist.get_backend() != "nccl":
        dist.destroy_process_group()
        return
    if tp is not None and tp.control is not None:
        dist.destroy_process_group(tp.control)
    dist.distributed_c10d._abort_process_group()
