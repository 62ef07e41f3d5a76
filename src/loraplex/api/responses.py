"""Engine results → OpenAI response bodies and SSE chunks (completions and chat)."""

from __future__ import annotations

import json

from loraplex.platform import TokenLogprobs

from .generation import ChoiceResult
from .schemas import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from .text import TextProcessor


def sse(payload: dict | str) -> bytes:
    data = (
        payload
        if isinstance(payload, str)
        else json.dumps(payload, separators=(",", ":"))
    )
    return f"data: {data}\n\n".encode()


def usage(results: list[ChoiceResult], prompt_tokens: int, n: int = 1) -> Usage:
    """Each prompt counts once (not n times), and so do its cached tokens: those of its first
    choice (choice i*n + j is choice j of prompt i)."""
    completion = sum(len(r.token_ids) for r in results)
    cached = sum(r.num_cached_tokens for r in results if r.index % n == 0)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def completion_logprobs(
    text: TextProcessor,
    token_ids: list[int],
    logprobs: list[TokenLogprobs],
    offset: int,
) -> CompletionLogprobs:
    tokens = [text.token_text(t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[{text.token_text(t): v for t, v in lp.top} for lp in logprobs],
        text_offset=offsets,
    )


def _top(text: TextProcessor, token_id: int, logprob: float) -> TopLogprob:
    token = text.token_text(token_id)
    return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))


def chat_logprobs(
    text: TextProcessor, token_ids: list[int], logprobs: list[TokenLogprobs]
) -> ChatLogprobs:
    content = []
    for token_id, lp in zip(token_ids, logprobs, strict=True):
        chosen = _top(text, token_id, lp.logprob)
        tops = [_top(text, t, v) for t, v in lp.top]
        content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=tops))
    return ChatLogprobs(content=content)
