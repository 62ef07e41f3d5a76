"""The OpenAI-compatible inference routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from loraplex.platform import EngineDeadError, InvalidRequestError, SamplingParams

from .auth import PrincipalDep, require_principal
from .engine_client import RequestStream, Submission
from .errors import ApiError
from .generation import ChoiceResult, merge, run_until_disconnect
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
    SamplingFields,
)
from .state import ApiState, Principal, get_state

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


def _sampling(
    body: SamplingFields, state: ApiState, max_tokens: int, logprobs: int | None, seed
):
    limits = state.config
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > limits.max_stop:
        raise ApiError(400, f"at most {limits.max_stop} stop sequences", param="stop")
    if any(len(s) > limits.max_stop_length or not s for s in stops):
        raise ApiError(
            400,
            f"stop sequences must have 1 to {limits.max_stop_length} characters",
            param="stop",
        )
    if logprobs is not None and logprobs > limits.max_logprobs:
        raise ApiError(400, f"at most {limits.max_logprobs} logprobs", param="logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise ApiError(400, f"{name} is not supported", param=name)
    top_k = body.top_k if body.top_k and body.top_k > 0 else 0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=top_k,
        min_p=body.min_p or 0.0,
        seed=seed,
        stop=tuple(stops),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
    )


def _check_n(body: SamplingFields, state: ApiState, num_prompts: int) -> None:
    if body.n > state.config.max_n:
        raise ApiError(400, f"n is at most {state.config.max_n}", param="n")
    if num_prompts * body.n > state.config.max_prompts:
        raise ApiError(
            400,
            f"at most {state.config.max_prompts} prompts x n per request",
            param="prompt",
        )


def _max_tokens(
    requested: int | None, prompt_len: int, state: ApiState, param: str
) -> int:
    limit = state.config.max_model_len
    if requested is None:
        requested = limit - prompt_len
    if prompt_len + requested > limit:
        raise ApiError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the "
            "completion). Please reduce the length of the prompt or completion.",
            param=param,
            code="context_length_exceeded",
        )
    return requested


@asynccontextmanager
async def _admitted(state: ApiState, principal: Principal, model: str):
    """Admission: queue bound, per-tenant concurrency, then the adapter's slot (pinned)."""
    tenant = principal.label
    config = state.config
    rejection = None
    if not state.client.thread.alive:
        rejection = ("engine_down", 503, "the engine is not running", 5)
    elif state.draining:
        rejection = ("draining", 503, "the server is shutting down", 5)
    elif state.client.num_active >= config.max_num_seqs + config.max_queued_requests:
        rejection = (
            "queue_full",
            503,
            "too many requests are queued; retry shortly",
            1,
        )
    elif state.active_by_tenant[tenant] >= config.max_concurrent_per_tenant:
        rejection = (
            "tenant_limit",
            429,
            "too many concurrent requests for this key",
            1,
        )
    if rejection is not None:
        reason, status, message, retry_after = rejection
        state.metrics.rejections.labels(reason).inc()
        raise ApiError(status, message, retry_after=retry_after)
    lease = None
    if model != state.config.served_model_name:
        lease = await state.resolver.acquire(principal, model)
        if lease is None:
            raise ApiError(
                404,
                f"The model `{model}` does not exist.",
                param="model",
                code="model_not_found",
            )
    state.active_by_tenant[tenant] += 1
    released = False

    def release() -> (
        None
    ):  # idempotent: the stream's cleanup and error paths may both call it
        nonlocal released
        if not released:
            released = True
            if lease is not None:
                lease.release()
            state.active_by_tenant[tenant] -= 1

    try:
        yield (lease.slot if lease is not None else None), release
    except BaseException:
        release()
        raise


async def _submit(
    state: ApiState, prefix: str, prompts, params: list[SamplingParams], slot
):
    submissions = [
        Submission(state.client.new_request_id(prefix), prompt, p, slot)
        for prompt, p in zip(prompts, params, strict=True)
    ]
    try:
        return await state.client.submit(submissions)
    except InvalidRequestError as exc:
        raise ApiError(400, str(exc)) from None
    except EngineDeadError:
        raise ApiError(503, "the engine is not running", retry_after=5) from None


async def _collect(streams: list[RequestStream], results: list[ChoiceResult], timers):
    async for i, out in merge(streams):
        timers[i].observe(out)
        results[i].add(out)


def _fan_out(body: SamplingFields, prompts: list[list[int]]):
    """Each prompt n times; choice i*n + j gets seed + j so the n samples differ."""
    seeds = [
        None if body.seed is None else (body.seed + j) % 2**64 for j in range(body.n)
    ]
    return [(p, seeds[j]) for p in prompts for j in range(body.n)]


@router.post("/completions", response_model=CompletionResponse)
async def create_completion(
    body: CompletionRequest,
    request: Request,
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
    _check_n(body, state, len(raw))
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
    fan = _fan_out(body, prompts)
    params = [
        _sampling(
            body,
            state,
            _max_tokens(body.max_tokens, len(p), state, "max_tokens"),
            body.logprobs,
            seed,
        )
        for p, seed in fan
    ]
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    results = [ChoiceResult(i, len(p)) for i, (p, _) in enumerate(fan)]
    timers = [state.metrics.timer(principal.label, body.model) for _ in fan]
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

    async with _admitted(state, principal, body.model) as (slot, release):
        streams = await _submit(state, "cmpl", [p for p, _ in fan], params, slot)
        if body.stream:
            include_usage = bool(
                body.stream_options and body.stream_options.include_usage
            )

            async def events() -> AsyncIterator[bytes]:
                async for i, out in merge(streams):
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
                            "usage": usage(results, prompt_tokens).model_dump(),
                        }
                    )
                yield sse("[DONE]")

            return _streaming(events(), streams, release)
        try:
            await run_until_disconnect(
                request.receive, _collect(streams, results, timers)
            )
        finally:
            for s in streams:
                s.close()
            release()
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
        usage=usage(results, prompt_tokens),
    )


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    principal: PrincipalDep,
):
    state = get_state(request)
    _check_n(body, state, 1)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt = state.text.encode_chat(messages)
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = _max_tokens(requested, len(prompt), state, "max_completion_tokens")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    fan = _fan_out(body, [prompt])
    params = [_sampling(body, state, max_tokens, logprobs, seed) for _, seed in fan]
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    results = [ChoiceResult(i, len(prompt)) for i in range(len(fan))]
    timers = [state.metrics.timer(principal.label, body.model) for _ in fan]

    def lp(tokens, lps):
        return (
            chat_logprobs(state.text, tokens, lps).model_dump()
            if body.logprobs
            else None
        )

    async with _admitted(state, principal, body.model) as (slot, release):
        streams = await _submit(state, "chat", [p for p, _ in fan], params, slot)
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
                async for i, out in merge(streams):
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
                            "usage": usage(results, len(prompt)).model_dump(),
                        }
                    )
                yield sse("[DONE]")

            return _streaming(events(), streams, release)
        try:
            await run_until_disconnect(
                request.receive, _collect(streams, results, timers)
            )
        finally:
            for s in streams:
                s.close()
            release()
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
        usage=usage(results, len(prompt)),
    )


def _streaming(
    events: AsyncIterator[bytes], streams: list[RequestStream], release
) -> StreamingResponse:
    """An SSE response whose cleanup (abort unfinished requests, unpin the slot) always runs."""

    def cleanup() -> None:
        for s in streams:
            s.close()
        release()

    return StreamingResponse(
        events,
        media_type="text/event-stream",
        background=BackgroundTask(cleanup),
        headers={"Cache-Control": "no-cache"},
    )
