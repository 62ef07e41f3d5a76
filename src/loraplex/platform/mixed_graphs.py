"""MixedGraphs: steps that carry prompt chunks, captured in CUDA graphs for token-count buckets.

A served engine runs mostly steps of this kind: the running requests decode while a new prompt,
or a chunk of one, is computed in the same step. Run eagerly, such a step launches every kernel
from Python (about 650 for the 8B shapes with LoRA), which can take longer than the GPU needs
for the step. Here a step of T tokens from at most `max_seqs` sequences replays the graph of the
smallest bucket of at least T tokens. Tokens are padded to the bucket and sequences to
`max_seqs + 1` rows, and every launch's grid depends on those sizes only:
- attention: the prefill kernel's grid is num_tokens // BLOCK_M + num_seqs, the decode kernel's
  num_seqs and max_model_len. Padding sequences have seq_len 0 and give zeros; the padding
  tokens belong to the last padding sequence, so every token row has its sequence;
- LoRA: `LoraSegmentBuffers` with 16-token tiles and a grid sized by capacity;
- FP8 linears: chosen from the bucket (a host int);
- the LM head reads `max_seqs + 1` rows at static indices; padding rows' logits are dropped.

On by default up to 4096 tokens on one GPU (EngineConfig.mixed_graph_tokens): on an H200 a
step of 63 decodes and a 512-token chunk took 112 ms eagerly, 111 ms of it host time, and 10.4
ms replayed (bench_engine, 2026-11-27). Off under tensor parallelism until measured. Without CUDA
(`capture=False`) the same buffers and padding run eagerly at every step, so that the CPU tests
check what a replay computes.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Sequence

import numpy as np
import torch

from loraplex.kernels.sgmv import LoraSegmentBuffers

from .batch import ScheduledBatch
from .cuda_graphs import capture_graphs
from .inputs import ForwardInputs
from .kv_cache import KVCache

log = logging.getLogger(__name__)

_TILE_TOKENS = 16  # one tile size for decode tokens and prompt chunks alike


def mixed_buckets(max_tokens: int) -> tuple[int, ...]:
    """Every 128 tokens up to 1024, then every 256, up to `max_tokens` (itself a bucket)."""
    sizes = [*range(128, 1025, 128), *range(1280, max(max_tokens, 1280) + 256, 256)]
    return tuple(sorted({min(s, max_tokens) for s in sizes}))


class MixedGraphs:
    """Static step inputs and one replayable forward per (token bucket, LoRA on/off)."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        *,
        buckets: Sequence[int],
        max_seqs: int,
        max_blocks_per_seq: int,
        max_model_len: int,
        max_loras: int,
        device: torch.device,
        capture: bool,
        pool=None,
    ) -> None:
        self.model, self.kv_cache, self.device = model, kv_cache, device
        self.buckets = tuple(sorted(buckets))
        self.max_tokens = t = self.buckets[-1]
        self.rows = s = max_seqs + 1  # the batch's sequences, then padding ones
        self.max_model_len = max_model_len
        self.capture = capture
        w = self.width = max_blocks_per_seq
        pinned = device.type == "cuda"
        # int64: input_ids [t], positions [t], KV-cache rows [t], logits indices [s];
        # int32: query_start_loc [s + 1], seq_lens [s], block tables [s, w].
        self._host64 = torch.zeros(3 * t + s, dtype=torch.int64, pin_memory=pinned)
        self._host32 = torch.zeros(
            2 * s + 1 + s * w, dtype=torch.int32, pin_memory=pinned
        )
        self._dev64 = torch.zeros_like(self._host64, device=device)
        self._dev32 = torch.zeros_like(self._host32, device=device)
        self._copied = torch.cuda.Event() if pinned else None
        host64, host32 = self._host64.numpy(), self._host32.numpy()
        self._input_ids, self._positions, self._kv_rows = host64[: 3 * t].reshape(3, t)
        self._logits_rows = host64[3 * t :]
        self._starts = host32[: s + 1]
        self._seq_lens = host32[s + 1 : 2 * s + 1]
        self._tables = host32[2 * s + 1 :].reshape(s, w)
        self.lora_buffers = (
            LoraSegmentBuffers.make(t, max_loras, device, _TILE_TOKENS)
            if max_loras > 0
            else None
        )
        self._lora_slots: list[int] | None = None  # what the LoRA buffers hold now
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]]
        self._graphs = {}
        self.num_replays = 0
        if capture:
            self._capture_all(pool)

    def bucket_for(self, batch: ScheduledBatch) -> int | None:
        """The bucket a step replays in, or None when it is too large (it runs eagerly)."""
        num_tokens = batch.num_tokens
        if len(batch.sequences) >= self.rows or num_tokens > self.max_tokens:
            return None
        return self.buckets[bisect.bisect_left(self.buckets, num_tokens)]

    def run(self, batch: ScheduledBatch, bucket: int) -> torch.Tensor:
        """Logits [num_sampling_sequences, vocab] float32 of the step, through its graph."""
        use_lora, num_sampling = self._fill(batch, bucket)
        if not self.capture:
            logits = self.model(self._inputs(bucket, use_lora), self.kv_cache)
        else:
            graph, logits = self._graphs[(bucket, use_lora)]
            graph.replay()
        self.num_replays += 1
        return logits[:num_sampling]

    def _fill(self, batch: ScheduledBatch, bucket: int) -> tuple[bool, int]:
        """Lay the step out as `prepare_inputs` does, padded into the static buffers; whether
        LoRA runs and how many sequences sample. Block-table rows are written up to each
        sequence's blocks; what lies past them is never read."""
        seqs = batch.sequences
        n = len(seqs)
        starts, counts, samples, slots = np.array(
            [
                (seq.start, seq.num_new_tokens, seq.samples, _slot(seq.request.slot))
                for seq in seqs
            ],
            dtype=np.int64,
        ).T
        ends = counts.cumsum()
        m = int(ends[-1])
        owner = np.arange(n).repeat(counts)
        positions = np.arange(m) + (starts - ends + counts)[owner]
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has left the staging buffers
        tables = self._tables
        for row, seq in enumerate(seqs):
            tables[row, : len(seq.block_ids)] = seq.block_ids
        block_size = self.kv_cache.block_size
        self._input_ids[:m] = np.fromiter(
            itertools.chain.from_iterable(seq.token_ids for seq in seqs), np.int64, m
        )
        self._input_ids[m:bucket] = 0
        self._positions[:m] = positions
        self._positions[m:bucket] = 0
        held = tables[owner, positions // block_size]
        self._kv_rows[:m] = held * block_size + positions % block_size
        self._kv_rows[m:bucket] = -1  # padding tokens write nothing to the KV cache
        sampling = ends[samples.astype(bool)] - 1
        self._logits_rows[: len(sampling)] = sampling
        self._logits_rows[len(sampling) :] = 0
        # Sequence rows: the batch's, then padding ones of no tokens but the last, which owns
        # the padding tokens; all of seq_len 0.
        self._starts[0] = 0
        self._starts[1 : n + 1] = ends
        self._starts[n + 1 : self.rows] = m
        self._starts[self.rows] = bucket
        self._seq_lens[:n] = starts + counts
        self._seq_lens[n:] = 0
        self._dev64.copy_(self._host64, non_blocking=True)
        self._dev32.copy_(self._host32, non_blocking=True)
        use_lora = self.lora_buffers is not None and bool((slots >= 0).any())
        if use_lora:
            token_slots = slots.repeat(counts).tolist() + [-1] * (bucket - m)
            if token_slots != self._lora_slots:
                self.lora_buffers.fill(token_slots)
                self._lora_slots = token_slots
        if self._copied is not None:
            self._copied.record()
        return use_lora, len(sampling)

    def _inputs(self, bucket: int, use_lora: bool) -> ForwardInputs:
        """ForwardInputs of `bucket` tokens as views of the static buffers (fixed addresses)."""
        t, s = self.max_tokens, self.rows
        return ForwardInputs(
            input_ids=self._dev64[:bucket],
            positions=self._dev64[t : t + bucket],
            slot_mapping=self._dev64[2 * t : 2 * t + bucket],
            block_tables=self._dev32[2 * s + 1 :].view(s, self.width),
            query_start_loc=self._dev32[: s + 1],
            seq_lens=self._dev32[s + 1 : 2 * s + 1],
            logits_indices=self._dev64[3 * t :],
            lora=self.lora_buffers.views(bucket) if use_lora else None,
            max_query_len=bucket,  # an upper bound: the prefill kernel runs in every graph
            max_seq_len=self.max_model_len,
        )

    def _capture_all(self, pool) -> None:
        variants = (True, False) if self.lora_buffers is not None else (False,)
        self._graphs = capture_graphs(
            self.model, self.kv_cache, self.buckets, variants, self._padded_inputs, pool
        )
        log.info(
            "captured %d CUDA graphs for steps with prompt chunks of up to %s tokens",
            len(self._graphs),
            ",".join(map(str, self.buckets)),
        )

    def _padded_inputs(self, bucket: int, use_lora: bool) -> ForwardInputs:
        self._fill_padding(bucket, use_lora)
        return self._inputs(bucket, use_lora)

    def _fill_padding(self, bucket: int, use_lora: bool) -> None:
        """Every token padding (nothing is written to the KV cache while capturing)."""
        self._lora_slots = None
        self._dev64.zero_()
        self._dev64[2 * self.max_tokens : 3 * self.max_tokens].fill_(-1)
        self._dev32.zero_()
        self._dev32[self.rows] = bucket  # the last padding sequence owns every token
        if use_lora:
            # LoRA tiles present (slot 0 on every token) so that the launches are recorded.
            self.lora_buffers.fill([0] * bucket)


def _slot(slot: int | None) -> int:
    return -1 if slot is None else slot
