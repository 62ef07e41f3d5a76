"""The paged KV cache tensors: one key and one value tensor per layer, in blocks of tokens."""

from __future__ import annotations

import torch

from .config import ModelSpec


class KVCache:
    """Keys and values of every layer, [num_blocks, block_size, num_kv_heads, head_dim] each.

    Row `block_id * block_size + offset` of a flattened layer cache holds one token; which
    blocks belong to which request is the BlockManager's business, not this class's.
    """

    def __init__(
        self,
        spec: ModelSpec,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (
            spec.num_layers,
            2,
            num_blocks,
            block_size,
            spec.num_kv_heads,
            spec.head_dim,
        )
        self.tensor = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes over all layers, keys and values."""
        per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim
        return per_token * block_size * dtype.itemsize

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key_cache, value_cache) of one layer."""
        return self.tensor[index, 0], self.tensor[index, 1]

    @property
    def num_bytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()
