"""Engine: token ids and adapter slots in, token ids (and text) out, one step at a time."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .blocks import BlockManager
from .config import EngineConfig, ModelSpec
from .engine_dir import open_engine_dir
from .engine_shard import build_shard
from .errors import AdapterShapeError, InvalidRequestError, ModelLoadError
from .lora_slots import LoraWeights, StagedRanks
from .outputs import OutputProcessor, RequestOutput
from .parallel import SINGLE, check_shardable
from .prefix_cache import PrefixScope, cache_root, engine_identity
from .request import FinishReason, Request, SamplingParams
from .sampler import HostSamples, Sampler
from .scheduler import Scheduler
from .step_times import StepTimes, StepTotals
from .tp_workers import TensorParallelWorkers, WorkerArgs, rank_device

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load."""

    num_running: int
    num_waiting: int
    num_free_kv_blocks: int
    num_kv_blocks: int
    num_preemptions: int
    running_slots: tuple[
        int, ...
    ] = ()  # adapter slots of running requests, one per request
    waiting_slots: tuple[int, ...] = ()
    prefix_cache_queries: int = 0  # prompt tokens of admitted requests, since start
    prefix_cache_hits: int = 0  # of those, tokens served from cached KV blocks
    num_cached_kv_blocks: int = 0  # blocks indexed by prefix hash (referenced or not)
    num_evictable_kv_blocks: int = 0  # cached blocks no request references (LRU)
    # Where the engine thread's time went since start (step_times.py): by kind of step, and
    # outside steps by activity.
    step_totals: dict[str, StepTotals] = field(default_factory=dict)
    thread_seconds: dict[str, float] = field(default_factory=dict)


class Engine:
    """One base model, its paged KV cache, its LoRA slots and an in-flight batch of requests.

    Not thread-safe: every call happens on the thread that owns the engine.
    """

    def __init__(
        self, config: EngineConfig, tokenizer: Tokenizer | None = None
    ) -> None:
        self.built = open_engine_dir(config.model)  # None for a Hugging Face checkpoint
        if self.built is not None:
            config = self.built.resolve(config)  # what the engine directory fixes
        self.config = config
        self.spec = ModelSpec.from_dir(config.model)
        self.device = _resolve_device(config.device)
        if self.built is not None:
            self.built.check_device(self.device)
        self.dtype = _resolve_dtype(config.dtype, self.spec, self.device)
        self.max_model_len = config.max_model_len or self.spec.max_position_embeddings
        if self.max_model_len > self.spec.max_position_embeddings:
            raise ModelLoadError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {self.spec.max_position_embeddings}"
            )
        self.workers: TensorParallelWorkers | None = None
        tp = SINGLE
        if config.tensor_parallel_size > 1:
            self.device = rank_device(self.device.type, 0)  # rank r runs on GPU r
            self.workers, tp = self._start_workers(config)
        if self.built is not None:
            log.info("%s", self.built.summary())
        try:
            shard = build_shard(
                config,
                self.spec,
                device=self.device,
                dtype=self.dtype,
                max_model_len=self.max_model_len,
                built=self.built,
                tp=tp,
            )
        except BaseException:
            self.close()
            raise
        self.model, self.lora_slots, self.runner = (
            shard.model,
            shard.lora_slots,
            shard.runner,
        )
        self.runner.peers = self.workers
        self._loaded_slots: set[int] = set()
        self._stage_stream: torch.cuda.Stream | None = (
            None  # stage_adapter's, made once
        )
        self.kv_cache = self.runner.kv_cache
        num_blocks = self.runner.num_kv_blocks
        self.scheduler = Scheduler(
            BlockManager(
                num_blocks,
                config.block_size,
                enable_caching=config.enable_prefix_caching,
            ),
            config.max_num_seqs,
            config.max_num_batched_tokens,
        )
        self.sampler = Sampler(self.spec.vocab_size, self.device)
        self.outputs = OutputProcessor(self.scheduler, tokenizer)
        self._requests: dict[str, Request] = {}
        self._aborted: list[RequestOutput] = []
        self.step_times = StepTimes()
        self._seed_source = random.Random(config.seed)
        log.info(
            "engine ready: %s on %s (%s), %d KV blocks, %d LoRA slots of rank %d",
            self.spec.architecture,
            self.device,
            self.dtype,
            num_blocks,
            config.max_loras,
            config.max_lora_rank,
        )

    def step(self) -> list[RequestOutput]:
        """Schedule → prepare inputs → forward → sample → update; returns what changed."""
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return self._take_finished([])
        logits = self.runner.forward(batch)  # a decode graph's replay or an eager pass
        host, waited = self._sample(logits, batch.sampling_sequences)
        updates = self.scheduler.update(batch, host.tokens)
        outputs = self._take_finished(self.outputs.process(updates, host.logprobs))
        kind = self.runner.last_step_kind
        self.step_times.record(kind, started, batch.num_tokens, waited)
        return outputs

    def _sample(self, logits: torch.Tensor, seqs: list) -> tuple[HostSamples, float]:
        """The sampled tokens on the host, and the seconds spent waiting for them: the
        step's one device→host copy, where the host waits for whatever the GPU still runs."""
        sampled = self.sampler.sample(logits, self.sampler.prepare(seqs))
        before = time.perf_counter()
        host = self.sampler.to_host(sampled, seqs)
        return host, time.perf_counter() - before

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        slot: int | None = None,
        scope: PrefixScope | None = None,
        priority: int = 0,
    ) -> None:
        """Queue a request; `slot` is the LoRA slot of its adapter, None for the base model.

        `scope` says with whom it may share cached KV blocks (see prefix_cache.py): the
        adapter's content digest and a salt. A request with a slot and no digest is not cached.
        `priority`: lower is scheduled first (scheduler.py).

        :raises InvalidRequestError: duplicate id, empty or too long prompt, bad token id or slot.
        """
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty")
        if any(not 0 <= t < self.spec.vocab_size for t in prompt_token_ids):
            raise InvalidRequestError(
                f"prompt token ids must be in [0, {self.spec.vocab_size})"
            )
        total = len(prompt_token_ids) + sampling.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_token_ids)} tokens) plus max_tokens ({sampling.max_tokens}) "
                f"is {total} tokens, more than the context of {self.max_model_len}"
            )
        if slot is not None and slot not in self._loaded_slots:
            raise InvalidRequestError(f"LoRA slot {slot} holds no adapter")
        if sampling.stop and self.outputs.tokenizer is None:
            raise InvalidRequestError(
                "stop strings need a tokenizer; this engine has none"
            )
        seed = (
            sampling.seed
            if sampling.seed is not None
            else self._seed_source.getrandbits(63)
        )
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling=sampling,
            seed=seed % (1 << 63),
            slot=slot,
            eos_token_ids=frozenset(self.spec.eos_token_ids),
            max_model_len=self.max_model_len,
            cache_root=self._cache_root(slot, scope or PrefixScope()),
            priority=priority,
            queued_at=time.monotonic(),
        )
        self._requests[request_id] = request
        self.scheduler.add(request)
        self.outputs.add(request)

    def abort(self, request_id: str) -> bool:
        """Stop a request now; its final output (finish_reason abort) comes with the next step."""
        request = self._requests.get(request_id)
        if request is None or request.is_finished:
            return False
        self.scheduler.finish(request, FinishReason.ABORT)
        self._aborted.append(self.outputs.aborted(request))
        return True

    def load_adapter(self, slot: int, weights: LoraWeights) -> None:
        """Write an adapter into a slot; call between steps, never for a slot in use.

        :raises AdapterShapeError: LoRA is off, the slot is busy, or the adapter does not fit.
        """
        self._check_slot_free(slot)
        self.lora_slots.write(slot, weights)
        if self.workers is not None:
            self.workers.load_adapter(slot, weights)
        self._loaded_slots.add(slot)

    def check_slot_free(self, slot: int) -> None:
        """Raise AdapterShapeError unless LoRA is on and no unfinished request uses `slot`."""
        self._check_slot_free(slot)

    def stage_adapter(self, slot: int, weights: LoraWeights) -> StagedRanks:
        """The first half of `load_adapter`, for a thread other than the engine's while steps
        run: the adapter's A and B go into a slot no request uses (on a side stream on a GPU,
        returning once they are there); `commit_adapter` finishes the load between steps.
        The caller first makes sure on the engine's thread that the slot is free
        (`check_slot_free`): this thread's own check sees requests, not aborts still queued.

        :raises AdapterShapeError: LoRA is off, the engine is tensor parallel (its workers
            load whole adapters), the slot is busy, or the adapter does not fit.
        """
        if self.workers is not None:
            raise AdapterShapeError("a tensor-parallel engine loads adapters whole")
        self._check_slot_free(slot)  # again in commit_adapter, on the engine's thread
        if self.device.type != "cuda":
            return self.lora_slots.stage(slot, weights)
        stream = self._stage_stream = self._stage_stream or torch.cuda.Stream(
            self.device
        )
        with torch.cuda.stream(stream):
            staged = self.lora_slots.stage(slot, weights)
        stream.synchronize()
        return staged

    def commit_adapter(self, slot: int, staged: StagedRanks) -> None:
        """Between steps: the ranks and scales of a slot that `stage_adapter` filled."""
        self._check_slot_free(slot)
        self.lora_slots.commit(slot, staged)
        self._loaded_slots.add(slot)

    def unload_adapter(self, slot: int) -> None:
        """Empty a slot so that it can be reused; never for a slot in use."""
        self._check_slot_free(slot)
        self.lora_slots.clear(slot)
        if self.workers is not None:
            self.workers.clear_slot(slot)
        self._loaded_slots.discard(slot)

    def close(self) -> None:
        """Release the decode graphs and stop the tensor-parallel workers, if any; the engine
        is unusable afterwards."""
        runner = getattr(self, "runner", None)  # absent when the shard failed to build
        if runner is not None:
            runner.close()
        if self.workers is not None:
            self.workers.stop()

    def _start_workers(self, config: EngineConfig):
        check_shardable(self.spec, config.tensor_parallel_size)
        args = WorkerArgs(
            config=config,
            spec=self.spec,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            rank=0,
            world_size=config.tensor_parallel_size,
            port=0,
            device_type=self.device.type,
        )
        return TensorParallelWorkers.start(args, config.tensor_parallel_size)

    def _check_slot_free(self, slot: int) -> None:
        if self.lora_slots is None:
            raise AdapterShapeError("LoRA is off in this engine (max_loras = 0)")
        requests = tuple(self._requests.values())  # one snapshot: may run off-thread
        busy = [r.request_id for r in requests if r.slot == slot and not r.is_finished]
        if busy:
            raise AdapterShapeError(
                f"slot {slot} is in use by {len(busy)} unfinished request(s)"
            )

    def _cache_root(self, slot: int | None, scope: PrefixScope) -> bytes | None:
        if not self.config.enable_prefix_caching:
            return None
        if slot is not None and scope.adapter_digest is None:
            return None  # the slot's weights have no name we could trust
        adapter = None if slot is None else scope.adapter_digest
        return cache_root(self._prefix_identity, adapter, scope.salt)

    @cached_property
    def _prefix_identity(self) -> bytes:
        model_config = (Path(self.config.model) / "config.json").read_bytes()
        return engine_identity(self.config, model_config, str(self.dtype))

    def forget_prefix(self, scope: PrefixScope) -> int:
        """Unindex the cached blocks of an adapter scope (after a delete or a replacement),
        so that they are reused first; returns how many. Correctness never depends on it."""
        if not self.config.enable_prefix_caching or scope.adapter_digest is None:
            return 0
        root = cache_root(self._prefix_identity, scope.adapter_digest, scope.salt)
        return self.scheduler.blocks.forget(root)

    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._aborted)

    def stats(self) -> EngineStats:
        blocks = self.scheduler.blocks
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_free_kv_blocks=blocks.num_free_blocks,
            num_kv_blocks=blocks.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            running_slots=tuple(
                r.slot for r in self.scheduler.running if r.slot is not None
            ),
            waiting_slots=tuple(
                r.slot for r in self.scheduler.waiting if r.slot is not None
            ),
            prefix_cache_queries=self.scheduler.prefix_cache.queries,
            prefix_cache_hits=self.scheduler.prefix_cache.hits,
            num_cached_kv_blocks=blocks.num_cached_blocks,
            num_evictable_kv_blocks=blocks.num_evictable_blocks,
            step_totals=dict(self.step_times.steps),
            thread_seconds=dict(self.step_times.thread_seconds),
        )

    def _take_finished(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        outputs = self._aborted + outputs
        self._aborted = []
        for out in outputs:
            if out.finished:
                self._requests.pop(out.request_id, None)
        return outputs


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str, spec: ModelSpec, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    return _DTYPES.get(spec.checkpoint_dtype, torch.float32)
