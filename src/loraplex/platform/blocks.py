"""BlockManager: which KV-cache blocks each request owns, as ints. No torch here.

The KV tensors live in kv_cache.py; this module only hands out block ids from a free list and
keeps a reference count per block, so that prefix sharing can later reuse a block from several
requests without a change of interface.
"""

from __future__ import annotations

from collections import deque

from .config import blocks_for


class BlockManager:
    """Free list and reference counts over `num_blocks` blocks of `block_size` tokens."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0, "a KV cache needs at least one block"
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def block_table(self, request_id: str) -> list[int]:
        """The request's blocks in position order (empty if it holds none)."""
        return self._tables.get(request_id, [])

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """New blocks the request needs so that its first `num_tokens` tokens have a home."""
        return max(
            blocks_for(num_tokens, self.block_size) - len(self.block_table(request_id)),
            0,
        )

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.blocks_needed(request_id, num_tokens) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's table to cover `num_tokens` tokens; returns the whole table.

        :raises MemoryError: not enough free blocks (callers check `can_allocate` first).
        """
        needed = self.blocks_needed(request_id, num_tokens)
        if needed > len(self._free):
            raise MemoryError(f"{needed} KV blocks needed, {len(self._free)} free")
        table = self._tables.setdefault(request_id, [])
        for _ in range(needed):
            block = self._free.popleft()
            self._ref_counts[block] = 1
            table.append(block)
        return table

    def free(self, request_id: str) -> None:
        """Release every block the request holds; blocks nobody references return to the pool."""
        for block in reversed(self._tables.pop(request_id, [])):
            self._ref_counts[block] -= 1
            assert self._ref_counts[block] >= 0, f"block {block} freed twice"
            if self._ref_counts[block] == 0:
                self._free.append(block)
