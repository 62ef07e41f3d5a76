"""Prefix caching in the BlockManager and Scheduler: pure Python, no model."""

from __future__ import annotations

import pytest

from loraplex.platform.blocks import BlockManager
from loraplex.platform.prefix_cache import block_hash, cache_root, engine_identity
from loraplex.platform.request import Request, SamplingParams
from loraplex.platform.scheduler import Scheduler

ROOT = cache_root(b"engine", None, None)


def chain(root: bytes, tokens: list[int], block_size: int) -> list[bytes]:
    """The chain hashes of the full blocks of `tokens`."""
    hashes, parent = [], root
    for i in range(len(tokens) // block_size):
        parent = block_hash(parent, tokens[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


def fill(blocks: BlockManager, rid: str, tokens: list[int], root: bytes = ROOT):
    """A request that computed `tokens`: allocated, and its full blocks indexed."""
    table = blocks.allocate(rid, len(tokens))
    hashes = chain(root, tokens, blocks.block_size)
    blocks.cache_blocks(rid, root, hashes, len(hashes))
    return table, hashes


def test_hash_chain_differs_per_root_and_is_stable():
    tokens = list(range(8))
    identity = b"e"
    roots = {
        "base": cache_root(identity, None, None),
        "base-salted": cache_root(identity, None, "tenant:a"),
        "base-other-salt": cache_root(identity, None, "tenant:b"),
        "adapter": cache_root(identity, "ab" * 32, "tenant:a"),
        "adapter-v2": cache_root(identity, "cd" * 32, "tenant:a"),
        "other-engine": cache_root(b"f", None, None),
        "empty-salt": cache_root(identity, None, ""),
    }
    assert len(set(roots.values())) == len(roots)
    chains = {name: tuple(chain(root, tokens, 4)) for name, root in roots.items()}
    assert len(set(chains.values())) == len(chains)
    assert all(len(c[0]) == 32 for c in chains.values())  # sha256, not Python's hash()
    assert chain(roots["base"], tokens, 4) == chain(roots["base"], tokens, 4)
    # A block's hash depends on every earlier token, not only its own.
    assert chain(ROOT, [9, 1, 2, 3, 4, 5, 6, 7], 4)[1] != chain(ROOT, tokens, 4)[1]
    # The adapter's digest and the string "base" can never name the same root.
    assert cache_root(identity, "base", None) != cache_root(identity, None, None)


def test_engine_identity_covers_every_engine_option():
    from loraplex.platform import EngineConfig

    a = engine_identity(EngineConfig(model="m"), b'{"x": 1}', "torch.float32")
    assert a == engine_identity(EngineConfig(model="m"), b'{"x": 1}', "torch.float32")
    assert a != engine_identity(EngineConfig(model="m"), b'{"x": 2}', "torch.float32")
    assert a != engine_identity(EngineConfig(model="m"), b'{"x": 1}', "torch.bfloat16")
    assert a != engine_identity(
        EngineConfig(model="m", seed=1), b'{"x": 1}', "torch.float32"
    )
    assert a != engine_identity(EngineConfig(model="m2"), b'{"x": 1}', "torch.float32")


def test_shared_blocks_count_references():
    blocks = BlockManager(num_blocks=8, block_size=4)
    table_a, hashes = fill(blocks, "a", list(range(10)))  # 2 full blocks + 2 tokens
    assert blocks.num_cached_blocks == 2
    cached = blocks.find_cached(hashes, 2)
    assert cached == table_a[:2]
    table_b = blocks.allocate("b", 11, cached)
    assert table_b[:2] == table_a[:2] and table_b[2] != table_a[2]
    assert [blocks.ref_count(b) for b in table_a] == [2, 2, 1]
    blocks.free("a")
    assert [blocks.ref_count(b) for b in table_b] == [1, 1, 1]
    assert blocks.num_evictable_blocks == 0  # still referenced by b: not evictable
    assert blocks.num_free_blocks == 8 - 3
    blocks.free("b")
    assert blocks.num_evictable_blocks == 2 and blocks.num_free_blocks == 8
    assert blocks.find_cached(hashes, 2) == table_a[:2]  # still cached after both left


def test_lru_evicts_oldest_tail_first_and_only_when_empty_blocks_run_out():
    blocks = BlockManager(num_blocks=6, block_size=2)
    _, first = fill(blocks, "first", [1, 2, 3, 4])  # blocks 0, 1
    _, second = fill(blocks, "second", [5, 6, 7, 8])  # blocks 2, 3
    blocks.free("first")
    blocks.free("second")  # LRU, oldest first: 1, 0, 3, 2 (each chain tail first)
    assert blocks.num_evictable_blocks == 4
    # The two empty blocks are used before any cached block is evicted.
    blocks.allocate("x", 4)
    assert blocks.num_cached_blocks == 4 and blocks.num_free_blocks == 4
    # Taking a cached block back makes it the most recently used: 1, 3, 2, 0.
    blocks.allocate("w", 2, blocks.find_cached(first, 1))
    blocks.free("w")
    evicted = []
    for rid in ("y", "z", "u"):
        before = {b for h in first + second for b in blocks.find_cached([h], 1)}
        blocks.allocate(rid, 2)
        after = {b for h in first + second for b in blocks.find_cached([h], 1)}
        evicted += sorted(before - after)
    assert evicted == [1, 3, 2]
    assert blocks.find_cached(first, 2) == [0] and blocks.find_cached(second, 2) == []


def test_referenced_blocks_are_never_evicted():
    blocks = BlockManager(num_blocks=4, block_size=2)
    table, hashes = fill(blocks, "running", [1, 2, 3, 4, 5, 6])  # 3 blocks, all cached
    assert blocks.num_free_blocks == 1
    assert not blocks.can_allocate("new", 4)
    with pytest.raises(MemoryError):
        blocks.allocate("new", 4)
    assert blocks.find_cached(hashes, 3) == table
    # A new request may share the referenced blocks, and needs free blocks only for the rest.
    assert blocks.can_allocate("sharer", 8, table)
    blocks.allocate("sharer", 8, table)
    assert blocks.num_free_blocks == 0
    assert [blocks.ref_count(b) for b in table] == [2, 2, 2]


def test_taking_a_cached_block_out_of_the_lru_counts_against_free_blocks():
    blocks = BlockManager(num_blocks=3, block_size=2)
    _, hashes = fill(blocks, "a", [1, 2, 3, 4])
    blocks.free("a")
    cached = blocks.find_cached(hashes, 2)
    assert blocks.num_free_blocks == 3
    assert blocks.can_allocate("b", 6, cached)  # 2 cached + the 1 empty block
    assert not blocks.can_allocate("b", 8, cached)  # would need 2 empty blocks


def test_duplicate_blocks_stay_private_and_caching_off_indexes_nothing():
    blocks = BlockManager(num_blocks=8, block_size=2)
    table_a, hashes = fill(blocks, "a", [1, 2, 3, 4])
    fill(blocks, "b", [1, 2, 3, 4])  # computed at the same time as a
    assert blocks.find_cached(hashes, 2) == table_a[:2]
    blocks.free("b")
    assert (
        blocks.num_evictable_blocks == 0
    )  # b's copies were never indexed: empty again
    off = BlockManager(num_blocks=8, block_size=2, enable_caching=False)
    fill(off, "a", [1, 2, 3, 4])
    assert off.num_cached_blocks == 0 and off.find_cached(hashes, 2) == []


def test_forget_unindexes_one_root_and_reuses_its_blocks_first():
    blocks = BlockManager(num_blocks=6, block_size=2)
    old = cache_root(b"e", "aa" * 32, "tenant:a")
    keep = cache_root(b"e", "bb" * 32, "tenant:a")
    _, old_hashes = fill(blocks, "old", [1, 2, 3, 4], old)
    _, keep_hashes = fill(blocks, "keep", [1, 2, 3, 4], keep)
    fill(blocks, "running", [9, 9], old)  # still referenced: unindexed, not freed
    blocks.free("old")
    blocks.free("keep")
    assert blocks.forget(old) == 3
    assert blocks.find_cached(old_hashes, 2) == []
    assert blocks.find_cached(keep_hashes, 2) != []
    blocks.allocate("new", 2 * 2)  # takes the forgotten blocks, not the cached ones
    assert len(blocks.find_cached(keep_hashes, 2)) == 2


# Scheduler: admission from the cache, stats, preemption.


def make_request(rid: str, prompt: list[int], max_tokens: int = 4, root=ROOT):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return Request(rid, list(prompt), params, seed=0, cache_root=root)


def run(scheduler: Scheduler, token: int = 7) -> None:
    while scheduler.has_unfinished:
        batch = scheduler.schedule()
        scheduler.update(batch, [token] * len(batch.sampling_sequences))


def test_a_request_starts_after_its_cached_prefix_and_the_last_token_is_computed():
    scheduler = Scheduler(
        BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64
    )
    prompt = list(range(1, 19))  # 4 full blocks + 2 tokens
    scheduler.add(make_request("warm", prompt))
    run(scheduler)
    assert scheduler.prefix_cache.queries == 18 and scheduler.prefix_cache.hits == 0

    again = make_request("again", prompt)
    scheduler.add(again)
    batch = scheduler.schedule()
    (seq,) = batch.sequences
    assert (seq.start, seq.num_new_tokens) == (16, 2)
    assert again.num_cached_tokens == 16 and scheduler.prefix_cache.hits == 16
    run(scheduler)

    # A prompt of exactly 4 full blocks reuses 3 of them: its last token must be computed.
    exact = make_request("exact", prompt[:16])
    scheduler.add(exact)
    (seq,) = scheduler.schedule().sequences
    assert (seq.start, seq.num_new_tokens) == (12, 4)
    run(scheduler)

    # Decodes fill blocks too: the 5th block (2 prompt tokens, 2 answer tokens) was cached
    # once computed, so a follow-up turn with the answer in its prompt finds it.
    turn = make_request("turn", prompt + [7, 7, 7, 7, 7, 7, 1])
    scheduler.add(turn)
    (seq,) = scheduler.schedule().sequences
    assert seq.start == 20
    run(scheduler)

    other = make_request("other-root", prompt, root=cache_root(b"engine", None, "t"))
    scheduler.add(other)
    (seq,) = scheduler.schedule().sequences
    assert seq.start == 0 and other.num_cached_tokens == 0


def test_chunked_prefill_caches_blocks_as_chunks_complete():
    scheduler = Scheduler(
        BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=12
    )
    prompt = list(range(1, 31))
    scheduler.add(make_request("long", prompt))
    batch = scheduler.schedule()  # 12 tokens: blocks are indexed only once computed
    assert scheduler.blocks.num_cached_blocks == 0
    scheduler.update(batch, [])
    assert scheduler.blocks.num_cached_blocks == 3
    scheduler.update(scheduler.schedule(), [])
    assert scheduler.blocks.num_cached_blocks == 6
    # A second request with the same prompt, arriving mid-prefill, reuses what is done,
    # and its cached tokens cost no budget (6 for long's last chunk, 6 for the follower).
    scheduler.add(make_request("follower", prompt))
    batch = scheduler.schedule()
    assert [
        (s.request.request_id, s.start, s.num_new_tokens) for s in batch.sequences
    ] == [
        ("long", 24, 6),
        ("follower", 24, 6),
    ]


def test_preemption_frees_references_and_readmission_hits_the_cache():
    # 8 blocks of 4: two requests of 12-token prompts growing by 8 tokens cannot both fit.
    scheduler = Scheduler(BlockManager(8, 4), max_num_seqs=4, max_num_batched_tokens=64)
    a = make_request("a", list(range(1, 13)), max_tokens=8)
    b = make_request("b", list(range(101, 113)), max_tokens=8)
    scheduler.add(a)
    scheduler.add(b)
    readmitted_at = None
    while scheduler.has_unfinished:
        batch = scheduler.schedule()
        if b.num_preemptions and readmitted_at is None:
            for seq in batch.sequences:
                if seq.request is b:
                    readmitted_at = seq.start
        scheduler.update(batch, [7] * len(batch.sampling_sequences))
    assert b.num_preemptions >= 1
    # b's blocks waited in the LRU; only its tail block was evicted for a's growth.
    assert readmitted_at == 12
    # Stats count first admissions only.
    assert scheduler.prefix_cache.queries == 24 and scheduler.prefix_cache.hits == 0
    assert scheduler.blocks.num_free_blocks == 8
