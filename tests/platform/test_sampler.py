"""Sampler: greedy, seeded sampling independent of the batch, top-k/top-p/min-p, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from loraplex.platform.batch import ScheduledSequence
from loraplex.platform.request import Request, SamplingParams
from loraplex.platform.sampler import Sampler, gumbel_noise

VOCAB = 50


def seqs_for(params: list[SamplingParams], seeds: list[int], steps=None):
    out = []
    for i, (p, seed) in enumerate(zip(params, seeds, strict=True)):
        request = Request(f"r{i}", [1, 2, 3], p, seed=seed)
        request.output_token_ids = [0] * (steps[i] if steps else 0)
        out.append(ScheduledSequence(request, 0, 3, (0,), True))
    return out


def sample(logits, params, seeds, steps=None):
    sampler = Sampler(VOCAB, torch.device("cpu"))
    seqs = seqs_for(params, seeds, steps)
    out = sampler.sample(logits, sampler.prepare(seqs))
    return Sampler.to_host(out, seqs)


def random_logits(n, seed=0):
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = random_logits(4)
    host = sample(logits, [SamplingParams(temperature=0.0)] * 4, [1, 2, 3, 4])
    assert host.tokens == logits.argmax(-1).tolist()


def test_seeded_sampling_ignores_the_rest_of_the_batch():
    logits = random_logits(1)
    alone = sample(logits, [SamplingParams(seed=5)], [5]).tokens[0]
    others = random_logits(5, seed=9)
    batch = torch.cat([others[:2], logits, others[2:]])
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=0)]
    params += [
        SamplingParams(seed=5),
        SamplingParams(top_k=3),
        SamplingParams(top_p=0.5),
    ]
    params.append(SamplingParams(min_p=0.1))
    together = sample(batch, params, [11, 12, 5, 13, 14, 15]).tokens[2]
    assert together == alone


def test_sampling_follows_the_softmax_distribution():
    """Over many (seed, step) pairs, token frequencies match softmax(logits / T)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0] + [-30.0] * (VOCAB - 4)])
    n = 4000
    seeds = torch.arange(n, dtype=torch.int64) * 7919 + 3
    steps = torch.arange(n, dtype=torch.int64) % 13
    noise = gumbel_noise(seeds, steps, VOCAB)
    tokens = (logits / 0.8 + noise).argmax(-1)
    freq = torch.bincount(tokens, minlength=VOCAB).double() / n
    probs = torch.softmax(logits[0].double() / 0.8, -1)
    for t in range(4):  # within 4 standard errors
        stderr = math.sqrt(probs[t] * (1 - probs[t]) / n)
        assert abs(freq[t] - probs[t]) < 4 * stderr + 1e-9
    assert freq[4:].sum() == 0


def test_top_k_top_p_min_p_restrict_the_support():
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0] + [-1.0] * (VOCAB - 4)]).repeat(64, 1)
    seeds = list(range(64))
    top2 = sample(logits, [SamplingParams(top_k=2)] * 64, seeds).tokens
    assert set(top2) <= {0, 1} and len(set(top2)) == 2
    nucleus = sample(logits, [SamplingParams(top_p=0.25)] * 64, seeds).tokens
    assert set(nucleus) == {0}  # p(first token) = 0.28 covers 25% alone
    nucleus = sample(logits, [SamplingParams(top_p=0.3)] * 64, seeds).tokens
    assert set(nucleus) == {0, 1}  # but not 30%: the second token is needed too
    minp = sample(logits, [SamplingParams(min_p=0.5)] * 64, seeds).tokens
    assert set(minp) <= {0, 1, 2} and len(set(minp)) == 3


def test_logprobs_of_the_chosen_and_top_tokens():
    logits = random_logits(3)
    params = [
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(seed=1),
        SamplingParams(temperature=0, logprobs=0),
    ]
    host = sample(logits, params, [1, 2, 3])
    ref = torch.log_softmax(logits, -1)
    first = host.logprobs[0]
    assert first.logprob == pytest.approx(ref[0, host.tokens[0]].item(), abs=1e-5)
    assert [t for t, _ in first.top] == ref[0].topk(3).indices.tolist()
    assert host.logprobs[1] is None
    assert host.logprobs[2].top == [] and host.logprobs[2].logprob <= 0
