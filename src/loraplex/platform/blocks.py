"""BlockManager: which KV-cache blocks each request owns, and which hold a cached prefix. No torch.

The KV tensors live in kv_cache.py; this module hands out block ids and keeps, per block, a
reference count and (once the block is full and computed) the chain hash naming its contents
(see prefix_cache.py). A block is in exactly one of three states:

- referenced: in the table of one or more requests (shared blocks are full, so read-only);
- cached: no reference, but its hash is indexed, so a request with that prefix can take it back;
  these wait in an LRU and are evicted (unindexed and reused) only when no empty block is left;
- empty: no reference and no hash.

A request's table is its cached prefix (if any) followed by blocks it fills itself.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

from .config import blocks_for


class BlockManager:
    """Free list, LRU of cached blocks and reference counts over `num_blocks` blocks.

    :param enable_caching: index full blocks by hash for reuse; off, freed blocks are empty.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool = True
    ) -> None:
        assert num_blocks > 0 and block_size > 0, "a KV cache needs at least one block"
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._empty: deque[int] = deque(range(num_blocks))
        # Cached blocks nobody references, least recently used first.
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._ref_counts = [0] * num_blocks
        self._hashes: list[bytes | None] = [None] * num_blocks
        self._roots: list[bytes | None] = [None] * num_blocks  # to forget a whole root
        self._index: dict[bytes, int] = {}  # chain hash → block
        self._tables: dict[str, list[int]] = {}
        # The tables as tuples, what each step's batch carries: kept until a table changes, so
        # that a request decoding inside its last block costs the scheduler no copy of it.
        self._frozen: dict[str, tuple[int, ...]] = {}
        self._num_indexed: dict[str, int] = {}  # leading table blocks already indexed

    @property
    def num_free_blocks(self) -> int:
        """Blocks a request could get now: empty ones and cached ones nobody references."""
        return len(self._empty) + len(self._lru)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose contents are indexed by hash (referenced or not)."""
        return len(self._index)

    @property
    def num_evictable_blocks(self) -> int:
        """Cached blocks that no request references (the LRU)."""
        return len(self._lru)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def block_table(self, request_id: str) -> list[int]:
        """The request's blocks in position order (empty if it holds none)."""
        return self._tables.get(request_id, [])

    def find_cached(self, block_hashes: Sequence[bytes], limit: int) -> list[int]:
        """The blocks of the longest cached run of the first `limit` of `block_hashes`."""
        if not self.enable_caching:
            return []
        found = []
        for position in range(min(limit, len(block_hashes))):
            block = self._index.get(block_hashes[position])
            if block is None:
                break
            found.append(block)
        return found

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """New blocks the request needs so that its first `num_tokens` tokens have a home."""
        return max(
            blocks_for(num_tokens, self.block_size) - len(self.block_table(request_id)),
            0,
        )

    def can_allocate(
        self, request_id: str, num_tokens: int, cached: Sequence[int] = ()
    ) -> bool:
        """Whether `allocate` would succeed (`cached`: blocks of `find_cached` it would take)."""
        needed = self.blocks_needed(request_id, num_tokens) - len(cached)
        # Taking a cached block out of the LRU leaves one block fewer to evict.
        reclaimed = sum(1 for block in cached if self._ref_counts[block] == 0)
        return needed <= self.num_free_blocks - reclaimed

    def allocate(
        self, request_id: str, num_tokens: int, cached: Sequence[int] = ()
    ) -> list[int]:
        """Grow the request's table to cover `num_tokens` tokens; returns the whole table.

        `cached` (only for a request that holds no blocks yet) starts the table with blocks
        found by `find_cached`: each gets one more reference, and leaves the LRU.
        :raises MemoryError: not enough blocks (callers check `can_allocate` first).
        """
        if not self.can_allocate(request_id, num_tokens, cached):
            raise MemoryError(
                f"{self.blocks_needed(request_id, num_tokens)} KV blocks needed, "
                f"{self.num_free_blocks} free"
            )
        self._frozen.pop(request_id, None)
        table = self._tables.setdefault(request_id, [])
        if cached:
            assert not table, "cached blocks can only start a table"
            for block in cached:
                if self._ref_counts[block] == 0:
                    del self._lru[block]
                self._ref_counts[block] += 1
                table.append(block)
            self._num_indexed[request_id] = len(cached)
        for _ in range(self.blocks_needed(request_id, num_tokens)):
            block = self._take_block()
            self._ref_counts[block] = 1
            table.append(block)
        return table

    def try_allocate(
        self, request_id: str, num_tokens: int, cached: Sequence[int] = ()
    ) -> tuple[int, ...] | None:
        """`allocate` when it can succeed, else None (nothing taken): the whole table as a
        tuple, the same object from step to step until the table grows.

        The scheduler calls it for every running request at every step; a decode that still
        fits in its last block returns at the first check.
        """
        frozen = self._frozen.get(request_id)
        if frozen is not None and len(frozen) * self.block_size >= num_tokens:
            return frozen
        if not self.can_allocate(request_id, num_tokens, cached):
            return None
        frozen = tuple(self.allocate(request_id, num_tokens, cached))
        self._frozen[request_id] = frozen
        return frozen

    def num_indexed(self, request_id: str) -> int:
        """Leading blocks of the request's table already indexed by `cache_blocks`."""
        return self._num_indexed.get(request_id, 0)

    def _take_block(self) -> int:
        """An empty block, or else the least recently used cached one, unindexed."""
        if self._empty:
            return self._empty.popleft()
        block, _ = self._lru.popitem(last=False)
        self._unindex(block)
        return block

    def _unindex(self, block: int) -> None:
        digest = self._hashes[block]
        if digest is not None and self._index.get(digest) == block:
            del self._index[digest]
        self._hashes[block] = None
        self._roots[block] = None

    def cache_blocks(
        self,
        request_id: str,
        root: bytes,
        block_hashes: Sequence[bytes],
        num_full: int,
    ) -> None:
        """Index the request's first `num_full` blocks (hashes in `block_hashes`), which are
        full and computed.

        Blocks indexed by an earlier call are skipped; a block whose hash another block already
        holds (two requests computed the same prefix at once) stays unindexed, a private copy.
        """
        if not self.enable_caching:
            return
        table = self._tables[request_id]
        start = self._num_indexed.get(request_id, 0)
        for position in range(start, num_full):
            block, digest = table[position], block_hashes[position]
            if digest not in self._index and self._hashes[block] is None:
                self._index[digest] = block
                self._hashes[block] = digest
                self._roots[block] = root
        self._num_indexed[request_id] = max(start, num_full)

    def free(self, request_id: str) -> None:
        """Drop the request's references; unreferenced blocks become cached (LRU) or empty.

        The table is released back to front, so that a chain's tail is evicted before its head,
        which more requests share.
        """
        self._num_indexed.pop(request_id, None)
        self._frozen.pop(request_id, None)
        for block in reversed(self._tables.pop(request_id, [])):
            self._ref_counts[block] -= 1
            assert self._ref_counts[block] >= 0, f"block {block} freed twice"
            if self._ref_counts[block] == 0:
                if self._hashes[block] is not None:
                    self._lru[block] = None
                else:
                    self._empty.append(block)

    def forget(self, root: bytes) -> int:
        """Unindex every block of one root (a deleted adapter): no request can find them again,
        and the unreferenced ones are reused before any other cached block. Returns how many.

        A scan of all blocks: for rare events, not for the step loop.
        """
        forgotten = 0
        for block in range(self.num_blocks):
            if self._roots[block] != root:
                continue
            self._unindex(block)
            forgotten += 1
            if self._ref_counts[block] == 0:
                del self._lru[block]
                self._empty.appendleft(block)
        return forgotten
