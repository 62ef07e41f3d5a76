"""Prefix-cache keys: who may share a KV block, and the chain hash that names it. No torch here.

A full KV block is named by a chain hash, h_i = H(h_{i-1}, token ids of block i), whose start
h_{-1} is the request's cache root. The root holds everything besides the tokens that decides
what the block's keys and values are, and who may read them:

- the engine's identity (its checkpoint, config.json, dtype and every other engine option);
- the adapter's content hash (the registry's sha256 of its files: never its name or version,
  which a replacement keeps or reuses), or "base" for requests without an adapter;
- a salt (the tenant), so that tenants never share blocks unless the operator allows it.

Two requests share a block only when they have the same root and the same tokens up to the end
of that block, so a new adapter version (new sha256), another adapter, another tenant or another
engine can never read a block computed for something else. Hashes are SHA-256 over a fixed,
length-prefixed byte encoding (never Python's `hash`, which is salted per process and 64 bits).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

_VERSION = b"loraplex-prefix-cache-v1"


@dataclass(frozen=True)
class PrefixScope:
    """What, besides the engine and the tokens, a request's cached KV depends on.

    :param adapter_digest: the adapter's content hash (registry sha256). A request with an
        adapter slot but no digest is never cached: the engine cannot tell its weights apart.
    :param salt: who may share the blocks (e.g. a tenant); None = anyone with the same root.
    """

    adapter_digest: str | None = None
    salt: str | None = None


def _field(value: str | bytes | None) -> bytes:
    """One field of a key: a presence byte, a length and the bytes (so no two encodings meet)."""
    if value is None:
        return b"\x00"
    raw = value.encode() if isinstance(value, str) else value
    return b"\x01" + struct.pack("<Q", len(raw)) + raw


def engine_identity(config: object, model_config: bytes, dtype: str) -> bytes:
    """The engine's part of every root: all EngineConfig fields, config.json and the dtype.

    Every option goes in, not only those known to change the KV values today, so that an option
    added later (a quantization, a KV-cache dtype) can never let two engines share blocks.
    """
    options = json.dumps(
        dataclasses.asdict(config), sort_keys=True, separators=(",", ":"), default=str
    )
    digest = hashlib.sha256(_VERSION)
    for part in (options, model_config, dtype):
        digest.update(_field(part))
    return digest.digest()


def cache_root(identity: bytes, adapter: str | None, salt: str | None) -> bytes:
    """h_{-1}: the engine identity, the adapter ("base" when None) and the salt."""
    adapter_field = _field("base") if adapter is None else _field("lora:" + adapter)
    return hashlib.sha256(
        _VERSION + _field(identity) + adapter_field + _field(salt)
    ).digest()


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """h_i = H(h_{i-1}, token ids of block i), token ids as little-endian uint32."""
    return hashlib.sha256(
        parent + struct.pack(f"<{len(token_ids)}I", *token_ids)
    ).digest()


@dataclass
class PrefixCacheStats:
    """Counters since start, in tokens, counted as vLLM v1 counts them.

    A request is counted once, when it is first admitted (re-admissions after a preemption are
    not): `queries` grows by its tokens and `hits` by the tokens its cached blocks covered.
    """

    queries: int = 0
    hits: int = 0

    def record(self, num_tokens: int, num_hits: int) -> None:
        self.queries += num_tokens
        self.hits += num_hits
