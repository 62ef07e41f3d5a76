"""Helpers shared by the engine tests: run requests to completion, reference generations."""

from __future__ import annotations

import torch

from loraplex.platform import Engine, SamplingParams


def run_to_completion(
    engine: Engine, requests: dict[str, tuple]
) -> dict[str, list[int]]:
    """requests: id → (prompt ids, SamplingParams, slot); returns id → generated token ids."""
    for request_id, (prompt, params, slot) in requests.items():
        engine.add_request(request_id, prompt, params, slot)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    for _ in range(10_000):
        if not engine.has_unfinished_requests:
            return tokens
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    raise AssertionError("the engine did not finish")


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generation for one prompt alone (EOS ignored)."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()
