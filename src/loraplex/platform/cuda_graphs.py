"""DecodeGraphs: the decode step captured in CUDA graphs for batch-size buckets, any adapter mix.

A decode step (every sequence computes one new token) is the same sequence of kernel launches
whatever the tokens, positions, block tables and adapters are, as long as those live at fixed
addresses and the grids do not depend on them. This module keeps them in static device buffers
sized for the largest bucket, captures one graph per bucket (batch padded up to it), and per
step copies the step's host ints into the buffers and replays. Two graphs per bucket when LoRA is
on: one with the SGMV launches (any mix of adapters, read from `LoraSegmentBuffers`) and one
without, so that base-only steps pay no LoRA launches.

Padding rows of a bucket are sequences of one token with `seq_len` 0 and KV-cache row -1: the
attention kernel writes nothing for them and returns zeros; their logits are dropped.

Without CUDA (`capture=False`) the same buffers and padding run eagerly at every step, so the
CPU tests check exactly what a replay computes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from loraplex.kernels.sgmv import LoraSegmentBuffers

from .batch import ScheduledBatch
from .inputs import ForwardInputs
from .kv_cache import KVCache

log = logging.getLogger(__name__)

# Decode tiles of the SGMV kernels: one adapter's decode tokens, at most 16 per program.
_DECODE_TILE_TOKENS = 16


def default_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every 8 up to 64 and every 16 beyond, capped by max_num_seqs."""
    sizes = [1, 2, 4, *range(8, 65, 8), *range(80, max(max_num_seqs, 80) + 16, 16)]
    capped = sorted({min(s, max_num_seqs) for s in sizes})
    return tuple(capped)


def capture_graphs(
    model: torch.nn.Module,
    kv_cache: KVCache,
    buckets: Sequence[int],
    variants: Sequence[bool],
    padded_inputs: Callable[[int, bool], ForwardInputs],
    pool=None,
) -> dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]]:
    """One CUDA graph of the model's forward per (bucket, LoRA on/off), largest bucket first so
    that smaller ones reuse its memory; `padded_inputs(bucket, use_lora)` fills the static
    buffers with padding and returns them as inputs. Each is run twice first (Triton compiles,
    allocators warm). Returns each graph with its output logits tensor."""
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()
    graphs = {}
    for bucket in sorted(buckets, reverse=True):
        for use_lora in variants:
            inputs = padded_inputs(bucket, use_lora)
            for _ in range(2):
                model(inputs, kv_cache)
            torch.cuda.synchronize(kv_cache.tensor.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = model(inputs, kv_cache)
            graphs[(bucket, use_lora)] = (graph, logits)
    torch.cuda.synchronize(kv_cache.tensor.device)
    return graphs


class DecodeGraphs:
    """Static decode inputs and one replayable forward per (bucket, LoRA on/off)."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        *,
        buckets: Sequence[int],
        max_blocks_per_seq: int,
        max_model_len: int,
        max_loras: int,
        device: torch.device,
        capture: bool,
        pool=None,
    ) -> None:
        """:param pool: a CUDA graph memory pool to capture into (shared with other graphs
        never replayed at the same time); None: a new one."""
        self.model = model
        self.kv_cache = kv_cache
        self.buckets = tuple(sorted(buckets))
        self.max_batch = self.buckets[-1]
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_model_len = max_model_len
        self.device = device
        self.capture = capture
        b = self.max_batch
        pinned = device.type == "cuda"
        # int64 rows: input_ids, positions, slot_mapping; int32 rows: seq_lens, block tables.
        self._host64 = torch.zeros(3 * b, dtype=torch.int64, pin_memory=pinned)
        self._host32 = torch.zeros(
            b + b * max_blocks_per_seq, dtype=torch.int32, pin_memory=pinned
        )
        self._dev64 = torch.zeros_like(self._host64, device=device)
        self._dev32 = torch.zeros_like(self._host32, device=device)
        self._arange64 = torch.arange(b + 1, dtype=torch.int64, device=device)
        self._arange32 = self._arange64.to(torch.int32)
        self._copied = torch.cuda.Event() if pinned else None
        # numpy views of the staging buffers: filled with vectorized writes, not torch.tensor
        host64, host32 = self._host64.numpy(), self._host32.numpy()
        self._input_ids, self._positions, self._rows = host64.reshape(3, b)
        self._seq_lens = host32[:b]
        self._tables = host32[b:].reshape(b, max_blocks_per_seq)
        self._row_index = np.arange(b)
        # What each block-table row holds now (the tuple last written there).
        self._row_tables: list[tuple[int, ...] | None] = [None] * b
        # Per bucket: the bucket a batch of n sequences replays in, and the staging → device
        # copies of its int32 part (the block-table rows it reads), as fixed views.
        self._bucket_of = [
            next(x for x in self.buckets if x >= n) for n in range(b + 1)
        ]
        self._copies32 = {
            x: (
                self._dev32[: b + x * max_blocks_per_seq],
                self._host32[: b + x * max_blocks_per_seq],
            )
            for x in self.buckets
        }
        self.lora_buffers = (
            LoraSegmentBuffers.make(b, max_loras, device, _DECODE_TILE_TOKENS)
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
        """The bucket a decode-only batch replays in, or None when it must run eagerly."""
        seqs = batch.sequences
        if len(seqs) > self.max_batch or not all(
            s.num_new_tokens == 1 and s.samples for s in seqs
        ):
            return None
        return self._bucket_of[len(seqs)]

    def run(self, batch: ScheduledBatch, bucket: int) -> torch.Tensor:
        """Logits [num_seqs, vocab] float32 of a decode-only batch, through its bucket's graph."""
        use_lora = self._fill(batch, bucket)
        if not self.capture:
            logits = self.model(self._inputs(bucket, use_lora), self.kv_cache)
        else:
            graph, logits = self._graphs[(bucket, use_lora)]
            graph.replay()
        self.num_replays += 1
        return logits[: len(batch.sequences)]

    def _fill(self, batch: ScheduledBatch, bucket: int) -> bool:
        """Copy the step's ints into the static buffers, padded to `bucket`; True if LoRA runs.

        One pass over the sequences gathers what only they know (position, input token, slot);
        everything derived from it (KV-cache rows, lengths, padding) is vectorized in numpy over
        the staging buffers. Only the block-table rows that changed are written: a row changes
        when its sequence gets a block (every block_size steps) or another sequence takes the
        row, so a steady decode writes a few rows a step. Stale ids past a row's blocks (and
        whole rows of padding, whose length is 0) are never read: the kernels read a row no
        further than its sequence's length. The LoRA segment metadata is rebuilt only when the
        rows' adapter slots change (the device buffers keep what the last fill wrote).
        """
        seqs = batch.sequences
        n = len(seqs)
        positions = [seq.start for seq in seqs]
        input_ids = [seq.request.token_at(seq.start) for seq in seqs]
        slots = [seq.request.slot for seq in seqs]
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the staging buffers
        self._write_tables(seqs)
        block_size = self.kv_cache.block_size
        self._input_ids[:n] = input_ids
        self._input_ids[n:] = 0
        pos = self._positions
        pos[:n] = positions
        pos[n:] = 0
        held = self._tables[self._row_index[:n], pos[:n] // block_size]
        self._rows[:n] = held * block_size + pos[:n] % block_size
        self._rows[n:] = -1  # padding rows write nothing to the KV cache
        self._seq_lens[:n] = pos[:n] + 1
        self._seq_lens[n:] = 0
        dev32, host32 = self._copies32[bucket]
        self._dev64.copy_(self._host64, non_blocking=True)
        dev32.copy_(host32, non_blocking=True)
        use_lora = self.lora_buffers is not None and any(s is not None for s in slots)
        if use_lora:
            token_slots = [-1 if s is None else s for s in slots]
            token_slots += [-1] * (bucket - n)
            if token_slots != self._lora_slots:
                self.lora_buffers.fill(token_slots)
                self._lora_slots = token_slots
        if self._copied is not None:
            self._copied.record()
        return use_lora

    def _write_tables(self, seqs) -> None:
        """Write the block-table rows whose sequence's blocks changed since the last fill."""
        row_tables, tables = self._row_tables, self._tables
        for row, seq in enumerate(seqs):
            ids, held = seq.block_ids, row_tables[row]
            # The scheduler hands the same tuple while a table is unchanged: `is` decides at
            # once; tables rebuilt elsewhere (a tensor-parallel worker's) compare by value.
            if ids is not held and ids != held:
                tables[row, : len(ids)] = ids
                row_tables[row] = ids

    def _inputs(self, bucket: int, use_lora: bool) -> ForwardInputs:
        """ForwardInputs of `bucket` rows as views of the static buffers (fixed addresses)."""
        b, width = self.max_batch, self.max_blocks_per_seq
        lora = None
        if use_lora:
            # Views only: the contents are whatever the last fill wrote, as in a replay.
            lora = self.lora_buffers.views(bucket)
        return ForwardInputs(
            input_ids=self._dev64[:bucket],
            positions=self._dev64[b : b + bucket],
            slot_mapping=self._dev64[2 * b : 2 * b + bucket],
            block_tables=self._dev32[b : b + bucket * width].view(bucket, width),
            query_start_loc=self._arange32[: bucket + 1],
            seq_lens=self._dev32[:bucket],
            logits_indices=self._arange64[:bucket],
            lora=lora,
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )

    def _capture_all(self, pool) -> None:
        """Capture every (bucket, LoRA) graph over padding rows everywhere (nothing is written
        to the KV cache while capturing)."""
        variants = (True, False) if self.lora_buffers is not None else (False,)
        self._graphs = capture_graphs(
            self.model, self.kv_cache, self.buckets, variants, self._padded_inputs, pool
        )
        log.info(
            "captured %d CUDA graphs for decode batch sizes %s",
            len(self._graphs),
            ",".join(map(str, self.buckets)),
        )

    def _padded_inputs(self, bucket: int, use_lora: bool) -> ForwardInputs:
        self._fill_padding(bucket, use_lora)
        return self._inputs(bucket, use_lora)

    def _fill_padding(self, bucket: int, use_lora: bool) -> None:
        self._row_tables = [None] * self.max_batch  # the host copy no longer matches
        self._lora_slots = None
        self._dev64.zero_()
        self._dev64[2 * self.max_batch :].fill_(-1)
        self._dev32.zero_()
        if use_lora:
            # Capture with LoRA tiles present (slot 0 for every row) so the launches are recorded;
            # the replays' fills decide which tiles do work.
            self.lora_buffers.fill([0] * bucket)
