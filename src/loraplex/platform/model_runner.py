"""ModelRunner: a scheduled batch in, logits out; owns the KV cache and the decode CUDA graphs.

It sizes the KV cache (explicitly, from the GPU memory left after a profiling forward, or on
the CPU enough for max_num_seqs full-length requests), allocates it, captures the decode graphs,
and at each step either replays a graph (decode-only batches within the largest bucket) or lays
the batch out with `prepare_inputs` and runs the model eagerly (prefill chunks, mixed steps).
On a GPU, unless `enforce_eager`, the norms, rotary and activation run through torch.compile.
Under tensor parallelism every rank has one, over its shard; the ranks agree on the number of KV
blocks (the smallest any rank can hold), and rank 0's `peers` send each step to the others
before it runs, so that all ranks run the same step, graph for graph.
"""

from __future__ import annotations

import gc
import logging

import torch

from .batch import ScheduledBatch, ScheduledSequence
from .config import EngineConfig, ModelSpec, blocks_for
from .cuda_graphs import DecodeGraphs, default_buckets
from .inputs import prepare_inputs
from .kv_cache import KVCache
from .memory_plan import MemoryPlan, plan_kv_blocks
from .mixed_graphs import MixedGraphs, mixed_buckets
from .model.fusions import compiled_fusions
from .parallel import SINGLE, TensorParallel, shard_spec
from .request import Request, SamplingParams

log = logging.getLogger(__name__)


class ModelRunner:
    """The model, its paged KV cache and the decode graphs, behind `forward(batch)`."""

    def __init__(
        self,
        model: torch.nn.Module,
        spec: ModelSpec,
        config: EngineConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
        lora_enabled: bool,
        tp: TensorParallel = SINGLE,
    ) -> None:
        self.model = model
        self.last_step_kind = "decode_eager"  # the last forward's, one of STEP_KINDS
        self.peers = None  # rank 0 of several: what sends each step to the other ranks
        spec = shard_spec(spec, tp)  # the KV cache holds this rank's KV heads
        self.config = config
        self.device = device
        self.lora_enabled = lora_enabled
        self.block_size = config.block_size
        self.max_blocks_per_seq = blocks_for(max_model_len, config.block_size)
        use_graphs = device.type == "cuda" and not config.enforce_eager
        buckets = default_buckets(config.max_num_seqs) if use_graphs else ()
        mixed_max = config.mixed_graph_tokens
        chunk_buckets = mixed_buckets(mixed_max) if use_graphs and mixed_max else ()
        graph_rows = sum(buckets) + len(chunk_buckets) * (config.max_num_seqs + 1)
        if (
            use_graphs
        ):  # compiled before the profiling forward, which is their first call
            model.use_fusions(compiled_fusions())
        self.memory_plan: MemoryPlan | None = None
        num_blocks = config.num_kv_blocks
        if not num_blocks and device.type == "cuda":
            self.memory_plan = plan_kv_blocks(
                device,
                config.gpu_memory_utilization,
                KVCache.bytes_per_block(spec, config.block_size, dtype),
                lambda: self._profile_forward(spec, dtype, max_model_len),
                max_num_seqs=config.max_num_seqs,
                vocab_size=spec.vocab_size,
                graph_rows=graph_rows * (2 if lora_enabled else 1),
            )
            num_blocks = self.memory_plan.num_blocks
        elif not num_blocks:
            num_blocks = config.max_num_seqs * self.max_blocks_per_seq
        num_blocks = tp.min_over_ranks(num_blocks)
        if num_blocks * config.block_size < max_model_len:
            raise ValueError(
                f"a KV cache of {num_blocks} blocks x {config.block_size} tokens cannot "
                f"hold one request of max_model_len {max_model_len} tokens"
            )
        self.kv_cache = KVCache(spec, num_blocks, config.block_size, dtype, device)
        self.decode_graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        pool = torch.cuda.graph_pool_handle() if use_graphs else None
        if (
            chunk_buckets
        ):  # first: the largest activations, which the decode graphs reuse
            self.mixed_graphs = MixedGraphs(
                model,
                self.kv_cache,
                buckets=chunk_buckets,
                max_seqs=config.max_num_seqs,
                max_blocks_per_seq=self.max_blocks_per_seq,
                max_model_len=max_model_len,
                max_loras=config.max_loras if lora_enabled else 0,
                device=device,
                capture=True,
                pool=pool,
            )
        if use_graphs:
            self.decode_graphs = DecodeGraphs(
                model,
                self.kv_cache,
                buckets=buckets,
                max_blocks_per_seq=self.max_blocks_per_seq,
                max_model_len=max_model_len,
                max_loras=config.max_loras if lora_enabled else 0,
                device=device,
                capture=True,
                pool=pool,
            )

    def close(self) -> None:
        """Release the CUDA graphs. A tensor-parallel rank does this before it leaves its
        group: NCCL will not tear down a communicator that live graphs still launch on."""
        if self.decode_graphs is None and self.mixed_graphs is None:
            return
        self.decode_graphs = self.mixed_graphs = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        gc.collect()

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache.num_blocks

    def forward(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [num_sampling_sequences, vocab] float32 of one scheduled step."""
        if self.peers is not None:
            self.peers.send_step(batch)
        graphs = self.decode_graphs
        bucket = graphs.bucket_for(batch) if graphs is not None else None
        if bucket is not None:
            self.last_step_kind = "decode_graph"
            return graphs.run(batch, bucket)
        mixed = self.mixed_graphs
        bucket = mixed.bucket_for(batch) if mixed is not None else None
        if bucket is not None:
            self.last_step_kind = "chunk_graph"
            return mixed.run(batch, bucket)
        decode_only = all(seq.num_new_tokens == 1 for seq in batch.sequences)
        self.last_step_kind = "decode_eager" if decode_only else "prefill"
        inputs = prepare_inputs(batch, self.block_size, self.device, self.lora_enabled)
        return self.model(inputs, self.kv_cache)

    def _profile_forward(
        self, spec: ModelSpec, dtype: torch.dtype, max_model_len: int
    ) -> None:
        """One forward of the whole token budget as prefills, LoRA on every token."""
        budget = self.config.max_num_batched_tokens
        lengths = [max_model_len] * (budget // max_model_len)
        if budget % max_model_len:
            lengths.append(budget % max_model_len)
        num_blocks = sum(blocks_for(n, self.block_size) for n in lengths)
        scratch = KVCache(spec, num_blocks, self.block_size, dtype, self.device)
        sequences, next_block = [], 0
        for i, length in enumerate(lengths):
            blocks = tuple(
                range(next_block, next_block + blocks_for(length, self.block_size))
            )
            next_block += len(blocks)
            request = Request(
                request_id=f"profile-{i}",
                prompt_token_ids=[1] * length,
                sampling=SamplingParams(max_tokens=1),
                seed=0,
                slot=0 if self.lora_enabled else None,
            )
            sequences.append(ScheduledSequence(request, 0, length, blocks, True))
        inputs = prepare_inputs(
            ScheduledBatch(tuple(sequences)),
            self.block_size,
            self.device,
            self.lora_enabled,
        )
        self.model(inputs, scratch)
        del scratch
