"""Sampler: `prepare` builds per-row sampling tensors on the host, `sample` picks tokens on the device.

Random sampling is the Gumbel-max trick over noise from a counter-based hash of (request seed,
index of the token being sampled, vocabulary id). The noise of a row therefore depends on nothing
else in the batch: the same seed gives the same tokens whatever runs beside it, and a request
that is preempted and recomputed samples exactly what it would have sampled anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .batch import ScheduledSequence

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters for the B sampling sequences of a step.

    When every row is greedy the tensors are None: argmax needs none of them, and a greedy
    step (the common case of benchmarks and of many deployments) then builds and copies none.
    """

    temperature: (
        torch.Tensor | None
    )  # [B] float32 (1 on greedy rows, where it is unused)
    top_k: torch.Tensor | None  # [B] int64, vocab size where off
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    seeds: torch.Tensor | None  # [B] int64, non-negative
    steps: torch.Tensor | None  # [B] int64, index of the output token being sampled
    greedy: torch.Tensor | None  # [B] bool
    all_greedy: bool
    uses_top_k_or_p: bool
    uses_min_p: bool
    num_top_logprobs: int  # alternatives to return per row (max over rows that asked)
    wants_logprobs: bool


@dataclass(frozen=True)
class SamplerOutput:
    tokens: torch.Tensor  # [B] int64
    chosen_logprobs: torch.Tensor | None  # [B] float32
    top_token_ids: torch.Tensor | None  # [B, K] int64
    top_logprobs: torch.Tensor | None  # [B, K] float32


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probability of the chosen token and the top alternatives, on the host."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class HostSamples:
    tokens: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device

    def prepare(self, seqs: list[ScheduledSequence]) -> SamplingTensors:
        """Host ints and floats of the sampling rows → tensors, in one transfer each kind
        (none at all when every row is greedy)."""
        params = [seq.request.sampling for seq in seqs]
        requested = [p.logprobs for p in params if p.logprobs is not None]
        if all(p.greedy for p in params):
            return SamplingTensors(
                *[None] * 7,
                all_greedy=True,
                uses_top_k_or_p=False,
                uses_min_p=False,
                num_top_logprobs=max(requested, default=0),
                wants_logprobs=bool(requested),
            )
        floats = np.array(
            [(p.temperature or 1.0, p.top_p, p.min_p) for p in params],
            dtype=np.float32,
        ).reshape(-1, 3)
        ints = np.array(
            [
                (
                    p.top_k or self.vocab_size,
                    seq.request.seed,
                    len(seq.request.output_token_ids),
                    p.greedy,
                )
                for p, seq in zip(params, seqs, strict=True)
            ],
            dtype=np.int64,
        ).reshape(-1, 4)
        floats = torch.from_numpy(floats).to(self.device)
        ints = torch.from_numpy(ints).to(self.device)
        return SamplingTensors(
            temperature=floats[:, 0],
            top_p=floats[:, 1],
            min_p=floats[:, 2],
            top_k=ints[:, 0],
            seeds=ints[:, 1],
            steps=ints[:, 2],
            greedy=ints[:, 3].bool(),
            all_greedy=False,
            uses_top_k_or_p=any(
                not p.greedy and (p.top_k or p.top_p < 1) for p in params
            ),
            uses_min_p=any(not p.greedy and p.min_p > 0 for p in params),
            num_top_logprobs=max(requested, default=0),
            wants_logprobs=bool(requested),
        )

    def sample(self, logits: torch.Tensor, st: SamplingTensors) -> SamplerOutput:
        """Pick one token per row of logits [B, vocab] float32, without a host sync."""
        tokens = logits.argmax(dim=-1)
        if not st.all_greedy:
            processed = logits / st.temperature[:, None]
            if st.uses_top_k_or_p:
                processed = _apply_top_k_top_p(processed, st.top_k, st.top_p)
            if st.uses_min_p:
                probs = torch.softmax(processed, dim=-1)
                threshold = st.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
                processed = processed.masked_fill(probs < threshold, float("-inf"))
            noise = gumbel_noise(st.seeds, st.steps, logits.shape[-1])
            sampled = (processed + noise).argmax(dim=-1)
            tokens = torch.where(st.greedy, tokens, sampled)
        if not st.wants_logprobs:
            return SamplerOutput(tokens, None, None, None)
        logprobs = torch.log_softmax(logits, dim=-1)
        top = (
            logprobs.topk(st.num_top_logprobs, dim=-1) if st.num_top_logprobs else None
        )
        return SamplerOutput(
            tokens,
            logprobs.gather(-1, tokens[:, None])[:, 0],
            top.indices if top is not None else None,
            top.values if top is not None else None,
        )

    @staticmethod
    def to_host(out: SamplerOutput, seqs: list[ScheduledSequence]) -> HostSamples:
        """The step's one device→host copy: the tokens, with the logprobs packed beside them."""
        if out.chosen_logprobs is None:
            return HostSamples(out.tokens.tolist(), [None] * len(seqs))
        columns = [out.tokens.double()[:, None], out.chosen_logprobs.double()[:, None]]
        if out.top_token_ids is not None and out.top_logprobs is not None:
            columns += [out.top_token_ids.double(), out.top_logprobs.double()]
        rows = torch.cat(
            columns, dim=1
        ).tolist()  # token ids < 2**53 are exact in float64
        k = (len(rows[0]) - 2) // 2 if rows else 0
        tokens, logprobs = [], []
        for row, seq in zip(rows, seqs, strict=True):
            tokens.append(int(row[0]))
            wanted = seq.request.sampling.logprobs
            if wanted is None:
                logprobs.append(None)
                continue
            top = [(int(row[2 + j]), row[2 + k + j]) for j in range(min(wanted, k))]
            logprobs.append(TokenLogprobs(row[1], top))
        return HostSamples(tokens, logprobs)


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    drop = ranks[None, :] >= top_k[:, None]
    probs = torch.softmax(sorted_logits, dim=-1)
    drop |= (probs.cumsum(dim=-1) - probs) > top_p[
        :, None
    ]  # the most likely token always stays
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2**32 for a in [0, 2**32), computed without int64 overflow."""
    low, high = a & 0xFFFF, a >> 16
    return (low * c + (((high * c) & 0xFFFF) << 16)) & _MASK32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer: every input bit affects every output bit."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def gumbel_noise(
    seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, vocab] float32, a pure function of (seed, step, token id).

    :param seeds: [B] int64, non-negative.
    :param steps: [B] int64, index of the output token being sampled.
    """
    row = _mix32(_mix32((seeds & _MASK32) ^ 0x243F6A88) ^ ((seeds >> 32) & _MASK32))
    row = _mix32(row ^ _mul32(steps & _MASK32, 0x9E3779B1))
    ids = _mul32(
        torch.arange(vocab_size, device=seeds.device, dtype=torch.int64), 0x27D4EB2F
    )
    h = _mix32(row[:, None] ^ ids[None, :])
    uniform = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(uniform))
