"""The OpenAI-compatible inference routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response

from .auth import PrincipalDep, require_principal
from .errors import ApiError
from .generation import ChoiceResult, merge
from .inference import (
    admitted,
    check_n,
    collect_until_done,
    fan_out,
    max_tokens_for,
    sampling_params,
    served_by,
    streaming_response,
    submit,
)
from .responses import chat_logprobs, completion_logprobs, sse, usage
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from .state import get_state

ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 429, 503)}
router = APIRouter(
    prefix="/v1", dependencies=[Depends(require_principal)], responses=ERRORS
)


@router.get("/models", response_model=ModelList)
async def list_models(request: Request, principal: PrincipalDep):
    """The base model and the caller's adapters (`parent` = the base model)."""
    state = get_state(request)
    base = state.config.served_model_name
    created = int(state.started_at)
    cards = [
        ModelCard(
            id=base,
            created=created,
            owned_by="loraplex",
            max_model_len=state.config.max_model_len,
        )
    ]
    cards += [
        ModelCard(
            id=name,
            created=created,
            owned_by=principal.label,
            root=name,
            parent=base,
            max_model_len=state.config.max_model_len,
        )
        for name in state.resolver.names(principal)
    ]
    return ModelList(data=cards)


@router.post("/completions", response_model=CompletionResponse)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    response: Response,
    principal: PrincipalDep,
):
    state = get_state(request)
    if body.echo or (body.best_of or 1) != 1 or body.suffix:
        raise ApiError(
            400, "echo, best_of > 1 and suffix are not supported", param="echo"
        )
    raw = body.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise ApiError(400, "prompt is empty", param="prompt")
    check_n(body, state, len(raw))
    prompts = [state.text.encode_prompt(p) for p in raw]
    for p in prompts:
        if not p:
            raise ApiError(400, "prompt is empty", param="prompt")
        if any(not 0 <= t < state.text.vocab_size for t in p):
            raise ApiError(
                400,
                f"prompt token ids must be in [0, {state.text.vocab_size})",
                param="prompt",
            )
    fan = fan_out(body, prompts)
    params = [
        sampling_params(
            body,
            state,
            max_tokens_for(body.max_tokens, len(p), state, "max_tokens"),
            body.logprobs,
            seed,
        )
        for p, seed in fan
    ]
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    results = [ChoiceResult(i, len(p)) for i, (p, _) in enumerate(fan)]
    arrived = getattr(request.state, "arrived", None)
    timers = [state.metrics.timer(principal.label, body.model, arrived) for _ in fan]
    prompt_tokens = sum(len(p) for p in prompts)

    def choice(r: ChoiceResult, text: str, tokens, lps, offset: int, reason) -> dict:
        logprobs = (
            completion_logprobs(state.text, tokens, lps, offset).model_dump()
            if body.logprobs is not None
            else None
        )
        return {
            "index": r.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": reason,
        }

    tokens = sum(len(p) + sp.max_tokens for (p, _), sp in zip(fan, params, strict=True))
    turn = admitted(state, principal, body.model, len(fan), tokens, request.receive)
    async with turn as (placement, release):
        streams = await submit(state, "cmpl", [p for p, _ in fan], params, placement)
        for timer in timers:
            timer.queued()
        if body.stream:
            include_usage = bool(
                body.stream_options and body.stream_options.include_usage
            )

            async def events() -> AsyncIterator[bytes]:
                # Seats and slot go to the next call once the engine is done, not
                # when a slow client has read the last chunk.
                async for i, out in merge(streams, on_done=release):
                    timers[i].observe(out)
                    r = results[i]
                    offset = len(r.text)
                    r.add(out)
                    reason = r.finish_reason if out.finished else None
                    c = choice(
                        r,
                        out.text_delta,
                        out.new_token_ids,
                        out.logprobs,
                        offset,
                        reason,
                    )
                    yield sse(
                        {
                            "id": rid,
                            "object": "text_completion",
                            "created": created,
                            "model": body.model,
                            "choices": [c],
                        }
                    )
                if include_usage:
                    yield sse(
                        {
                            "id": rid,
                            "object": "text_completion",
                            "created": created,
                            "model": body.model,
                            "choices": [],
                            "usage": usage(results, prompt_tokens, body.n).model_dump(),
                        }
                    )
                yield sse("[DONE]")

            return streaming_response(events(), streams, release)
        await collect_until_done(request, streams, results, timers, release)
        response.headers.update(served_by(streams))
    choices = [
        CompletionChoice(
            **choice(r, r.text, r.token_ids, r.logprobs, 0, r.finish_reason)
        )
        for r in results
    ]
    return CompletionResponse(
        id=rid,
        created=created,
        model=body.model,
        choices=choices,
        usage=usage(results, prompt_tokens, body.n),
    )


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    principal: PrincipalDep,
):
    state = get_state(request)
    check_n(body, state, 1)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt = state.text.encode_chat(messages)
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = max_tokens_for(requested, len(prompt), state, "max_completion_tokens")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    fan = fan_out(body, [prompt])
    params = [
        sampling_params(body, state, max_tokens, logprobs, seed) for _, seed in fan
    ]
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    results = [ChoiceResult(i, len(prompt)) for i in range(len(fan))]
    arrived = getattr(request.state, "arrived", None)
    timers = [state.metrics.timer(principal.label, body.model, arrived) for _ in fan]

    def lp(tokens, lps):
        return (
            chat_logprobs(state.text, tokens, lps).model_dump()
            if body.logprobs
            else None
        )

    tokens = len(fan) * (len(prompt) + max_tokens)
    turn = admitted(state, principal, body.model, len(fan), tokens, request.receive)
    async with turn as (placement, release):
        streams = await submit(state, "chat", [p for p, _ in fan], params, placement)
        for timer in timers:
            timer.queued()
        if body.stream:
            include_usage = bool(
                body.stream_options and body.stream_options.include_usage
            )
            head = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
            }

            async def events() -> AsyncIterator[bytes]:
                for r in results:
                    delta = {"role": "assistant", "content": ""}
                    yield sse(
                        {
                            **head,
                            "choices": [
                                {
                                    "index": r.index,
                                    "delta": delta,
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                        }
                    )
                # Seats and slot go to the next call once the engine is done, not
                # when a slow client has read the last chunk.
                async for i, out in merge(streams, on_done=release):
                    timers[i].observe(out)
                    r = results[i]
                    r.add(out)
                    reason = r.finish_reason if out.finished else None
                    delta = (
                        {"content": out.text_delta}
                        if out.text_delta or not reason
                        else {}
                    )
                    c = {
                        "index": r.index,
                        "delta": delta,
                        "logprobs": lp(out.new_token_ids, out.logprobs),
                        "finish_reason": reason,
                    }
                    yield sse({**head, "choices": [c]})
                if include_usage:
                    yield sse(
                        {
                            **head,
                            "choices": [],
                            "usage": usage(results, len(prompt), body.n).model_dump(),
                        }
                    )
                yield sse("[DONE]")

            return streaming_response(events(), streams, release)
        await collect_until_done(request, streams, results, timers, release)
        response.headers.update(served_by(streams))
    choices = [
        ChatChoice(
            index=r.index,
            message=AssistantMessage(content=r.text),
            logprobs=lp(r.token_ids, r.logprobs),
            finish_reason=r.finish_reason,
        )
        for r in results
    ]
    return ChatCompletionResponse(
        id=rid,
        created=created,
        model=body.model,
        choices=choices,
        usage=usage(results, len(prompt), body.n),
    )
