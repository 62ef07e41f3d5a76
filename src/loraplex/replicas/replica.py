"""EngineReplica: the body of the Ray Serve deployment that runs one engine.

Each replica owns an Engine on its EngineThread and its own tiered AdapterPool (host memory,
then device slots). Adapters are keyed by registry id; the ids a replica holds are announced
to Ray Serve's router through model multiplexing (`serve.multiplexed`, sized to the host
tier), so a request for an adapter goes to a replica that holds it when one does. A replica
that misses fetches the adapter's files from Ray's object store (put there by the front,
which owns the registry), checks their sha256 against the registry's, and validates them
again before the pool loads them: no shared filesystem, and no trust in bytes in transit.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import ray
from ray import serve

from loraplex.adapters_registry import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterCorrupt,
    AdapterLoadError,
    AdapterPool,
    EngineThreadSlotWriter,
    PoolConfig,
    RegistryError,
    validate_adapter_bytes,
)
from loraplex.adapters_registry.artifacts import content_digest
from loraplex.api import EngineClient
from loraplex.api.engine_client import Submission
from loraplex.api.generation import merge
from loraplex.platform import (
    Engine,
    EngineDeadError,
    EngineThread,
    InvalidRequestError,
    LoraWeights,
)
from loraplex.serve import engine_config
from loraplex.serve_settings import ServeSettings

from .board import REPORT_PERIOD_S, Report, find_board
from .wire import Accepted, AdapterSource, Job, Refused, ReplicaFacts

log = logging.getLogger(__name__)


def fetch_verified(source: AdapterSource, where: str) -> tuple[bytes, bytes]:
    """An adapter's two files from the object store, checked against the registry's sha256.

    :raises AdapterCorrupt: the bytes that arrived are not the ones the registry stored.
    """
    config_bytes, weights_bytes = ray.get(source.payload)
    found = content_digest(
        {
            ADAPTER_CONFIG: hashlib.sha256(config_bytes).hexdigest(),
            ADAPTER_WEIGHTS: hashlib.sha256(weights_bytes).hexdigest(),
        }
    )
    if found != source.digest:
        raise AdapterCorrupt(
            f"adapter {source.key}'s files reached {where} with sha256 {found[:12]}…, "
            f"not the registry's {source.digest[:12]}…"
        )
    return config_bytes, weights_bytes


class _Held:
    """What Ray's multiplexing cache holds for one adapter: dropping it (LRU) evicts the
    adapter from the replica's pool unless a request still uses it."""

    def __init__(self, replica: EngineReplica, key: int) -> None:
        self.replica, self.key, self._dropped = replica, key, False

    def __del__(self) -> None:  # Ray calls it on unload, Python again on collection
        if not self._dropped:
            self._dropped = True
            self.replica.drop(self.key)


class EngineReplica:
    """One engine replica (wrapped by `serve.deployment` in `loraplex.replicas.app`)."""

    def __init__(self, settings: ServeSettings, model: str) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
        self.engine = Engine(
            engine_config(settings, Path(model)),
            tokenizer=tokenizer.backend_tokenizer,
        )
        self.thread = EngineThread(self.engine).start()
        self.client = EngineClient(self.thread)
        self.pool = AdapterPool(
            PoolConfig(
                max_loras=settings.max_loras,
                max_cpu_loras=settings.max_cpu_loras,
                dtype=self.engine.dtype,
                device=str(self.engine.device),
                acquire_timeout_s=settings.adapter_wait_timeout,
            ),
            EngineThreadSlotWriter(self.thread),
            self._load,
        )
        context = serve.get_replica_context()
        self.replica_id, self.app_name = context.replica_id.unique_id, context.app_name
        self._sources: dict[int, AdapterSource] = {}  # the newest source of each key

        # Sized like the host tier: the router should send an adapter where it is held.
        async def held(key: str) -> _Held:  # the pool loads on acquire; this announces
            return _Held(self, int(key))

        self._hold = serve.multiplexed(
            max_num_models_per_replica=settings.max_cpu_loras
        )(held)
        self._stop = threading.Event()
        threading.Thread(
            target=self._report_loop, name="loraplex-report", daemon=True
        ).start()

    # -- requests -------------------------------------------------------------------------

    async def generate(self, job: Job) -> AsyncIterator[object]:
        """Run a call's requests: first Accepted (or Refused), then (index, RequestOutput)
        as the engine produces them. Cancelling the call aborts its requests."""
        try:
            slot, key = await self._place(job.adapter)
        except (InvalidRequestError, RegistryError, EngineDeadError) as exc:
            yield Refused(exc)
            return
        try:
            submissions = [
                Submission(r.request_id, r.prompt_token_ids, r.sampling, slot, r.scope)
                for r in job.requests
            ]
            try:
                streams = await self.client.submit(submissions)
            except (InvalidRequestError, EngineDeadError) as exc:
                yield Refused(exc)
                return
            yield Accepted(self.replica_id)
            async for i, out in merge(streams):
                yield i, out
        finally:
            if key is not None:
                self.pool.release(key)

    async def _place(
        self, source: AdapterSource | None
    ) -> tuple[int | None, int | None]:
        """Pin the job's adapter in a slot (loading it if needed): (slot, key)."""
        if source is None:
            return None, None
        if not self.thread.alive:
            raise EngineDeadError("the engine of this replica stopped")
        key = int(source.key)
        self._sources[key] = source
        await self._hold(source.key)
        acquiring = asyncio.ensure_future(asyncio.to_thread(self.pool.acquire, key))
        try:
            return await asyncio.shield(acquiring), key
        except (
            asyncio.CancelledError
        ):  # the pin still lands on its thread: undo it then
            acquiring.add_done_callback(lambda f: self._unpin_if_pinned(f, key))
            raise

    def _unpin_if_pinned(self, acquired: asyncio.Future, key: int) -> None:
        if not acquired.cancelled() and acquired.exception() is None:
            self.pool.release(key)

    def _load(self, key: int) -> LoraWeights:
        """The pool's loader (on a pool thread): object store → checked → validated."""
        source = self._sources.get(key)
        if source is None:
            raise AdapterLoadError(f"no source for adapter {key} on this replica")
        config_bytes, weights_bytes = fetch_verified(source, self.replica_id)
        return validate_adapter_bytes(
            config_bytes,
            weights_bytes,
            self.engine.spec,
            self.engine.config.max_lora_rank,
        ).weights

    def drop(self, key: int) -> None:
        """Forget an adapter Ray's cache let go of (the pool keeps it while in use)."""
        self._sources.pop(key, None)
        self.pool.evict(key)

    # -- what the front asks ----------------------------------------------------------------

    def describe(self) -> ReplicaFacts:
        """The engine's resolved limits and the model's shapes."""
        config = self.engine.config
        return ReplicaFacts(
            spec=self.engine.spec,
            max_model_len=self.engine.max_model_len,
            max_lora_rank=config.max_lora_rank,
            max_num_seqs=config.max_num_seqs,
            max_loras=config.max_loras,
            device=str(self.engine.device),
        )

    async def pin(self, source: AdapterSource) -> int:
        """Keep an adapter in a device slot of this replica (the admin's pin)."""
        key = int(source.key)
        self._sources[key] = source
        await self._hold(source.key)
        return await asyncio.to_thread(self.pool.pin, key)

    async def prefetch(self, source: AdapterSource, to: str) -> None:
        """Load an adapter into this replica's host tier or a device slot, unpinned."""
        key = int(source.key)
        self._sources[key] = source
        await self._hold(source.key)
        await asyncio.wrap_future(self.pool.prefetch(key, to))

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine stopped is replaced."""
        if not self.thread.alive:
            raise RuntimeError(f"engine stopped: {self.thread.error!r}")

    def __del__(self) -> None:
        """Ray Serve's shutdown hook: stop reporting, the engine and the pool."""
        self._stop.set()
        self.thread.stop()
        self.pool.close()

    # -- the board --------------------------------------------------------------------------

    def _report(self) -> Report:
        entries = self.pool.snapshot()
        by_slot = {e.slot: int(e.key) for e in entries if e.slot is not None}
        stats = self.thread.stats()
        stats = replace(  # slots mean nothing outside this replica; adapter ids do
            stats,
            running_slots=tuple(
                by_slot[s] for s in stats.running_slots if s in by_slot
            ),
            waiting_slots=tuple(
                by_slot[s] for s in stats.waiting_slots if s in by_slot
            ),
        )
        held = self.pool.host.keys()  # LRU first
        host = [(int(k), self.pool.host.bytes_of(k)) for k in held]
        error = repr(self.thread.error) if self.thread.error is not None else None
        return Report(
            replica_id=self.replica_id,
            alive=self.thread.alive,
            error=error,
            stats=stats,
            pool=entries,
            host=host,
            pool_metrics=self.pool.metrics.snapshot(),
        )

    def _report_loop(self) -> None:
        board, seen = None, -1
        while not self._stop.wait(REPORT_PERIOD_S):
            try:
                board = board or find_board(self.app_name)
                if board is None:
                    continue
                seen, commands = ray.get(
                    board.report.remote(self._report(), seen), timeout=10
                )
                for kind, arg in commands:
                    self._apply(kind, arg)
            except Exception:  # the board may restart; report again
                log.warning("report to the replica board failed", exc_info=True)
                board = None

    def _apply(self, kind: str, arg) -> None:
        if kind == "evict":
            self.pool.evict(arg)
        elif kind == "unpin":
            self.pool.unpin(arg)
        elif kind == "forget_prefix":
            self.thread.call(lambda engine: engine.forget_prefix(arg))
