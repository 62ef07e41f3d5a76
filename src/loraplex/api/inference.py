"""What the inference routes share: request → SamplingParams, admission, submission, streaming."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from loraplex.adapters_registry import PoolExhausted
from loraplex.platform import (
    EngineDeadError,
    InvalidRequestError,
    PrefixScope,
    SamplingParams,
)

from .admission import ClientGone, Refused
from .admission_types import AllResident, Ticket
from .engine_client import OutputStream, Submission
from .errors import ApiError
from .generation import ChoiceResult, merge, run_until_disconnect
from .responses import sse
from .schemas import SamplingFields
from .state import AdapterLease, ApiState, Principal


def sampling_params(
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
    try:
        return _sampling(body, max_tokens, top_k, seed, stops, logprobs)
    except (
        ValueError
    ) as exc:  # SamplingParams names the field; the schema let it through
        raise ApiError(400, str(exc)) from None


def _sampling(body: SamplingFields, max_tokens, top_k, seed, stops, logprobs):
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


def check_n(body: SamplingFields, state: ApiState, num_prompts: int) -> None:
    if body.n > state.config.max_n:
        raise ApiError(400, f"n is at most {state.config.max_n}", param="n")
    if num_prompts * body.n > state.config.max_prompts:
        raise ApiError(
            400,
            f"at most {state.config.max_prompts} prompts x n per request",
            param="prompt",
        )


def max_tokens_for(
    requested: int | None, prompt_len: int, state: ApiState, param: str
) -> int:
    limit = state.config.max_model_len
    if requested is None:
        # Default to the rest of the context, but at least 1, so that a prompt that fills
        # the context is answered with the context-length error below.
        requested = max(limit - prompt_len, 1)
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


@dataclass(frozen=True)
class Placement:
    """Where an admitted call runs: its adapter slot (None = base model) and with whom its
    requests may share cached KV."""

    slot: int | None
    scope: PrefixScope
    lease: AdapterLease | None = None  # engines that pin slots themselves read it
    ticket: Ticket | None = None  # admission's, told the call's engine request ids


def tenant_salt(principal: Principal) -> str:
    """The prefix-cache salt of a caller: its tenant (or the admin)."""
    return "admin" if principal.is_admin else f"tenant:{principal.tenant_id}"


def prefix_scope(state: ApiState, principal: Principal, lease) -> PrefixScope:
    """The tenant salts every scope; the adapter's content digest names its KV. Base-only
    prefixes drop the salt only when the operator lets tenants share them (timing leaks)."""
    salt = tenant_salt(principal)
    if lease is None:
        shared = state.config.share_base_prefix_across_tenants
        return PrefixScope(None, None if shared else salt)
    # A lease without a digest (a resolver that does not know content) is never cached.
    return PrefixScope(getattr(lease, "digest", None), salt)


@asynccontextmanager
async def admitted(
    state: ApiState,
    principal: Principal,
    model: str,
    seats: int = 1,
    tokens: int = 0,
    receive=None,
):
    """Admission: the engine is up, the adapter exists, a fair turn (api/admission.py), then
    the adapter's slot (pinned).

    :param seats: engine requests of the call (prompts x n); `tokens`: prompt + max_tokens of
        them all, for the tenant's token rate; `receive`: the ASGI receive, to stop waiting
        when the client leaves.
    Yields the call's Placement and its release function.
    """
    tenant = principal.label
    rejection = None
    if not state.client.alive:
        rejection = ("engine_down", 503, "the engine is not running", 5)
    elif state.draining:
        rejection = ("draining", 503, "the server is shutting down", 5)
    if rejection is not None:
        reason, status, message, retry_after = rejection
        state.metrics.rejections.labels(reason).inc()
        raise ApiError(status, message, retry_after=retry_after)
    if state.active_by_tenant[tenant] >= state.admission.config.max_per_tenant:
        # Admission would refuse it too; before the adapter lookup, a flooding tenant's
        # extra calls cost no worker thread and no catalog query.
        raise _refused(state, Refused.of("tenant_limit", 1))
    key = None
    if model != state.config.served_model_name:
        key = await _locate(state, principal, model)
    state.active_by_tenant[tenant] += 1
    ticket = lease = None

    # Idempotent: the end of the engine's work, the stream's cleanup and the error paths
    # may all call it.
    def release() -> None:
        nonlocal ticket, lease
        if lease is not None:
            lease, done = None, lease
            done.release()
        if ticket is not None:
            ticket, done = None, ticket
            done.release()
            state.active_by_tenant[tenant] -= 1

    try:
        ticket = await _turn(
            state, state.admission.admit(tenant, key, seats, tokens, _gone(receive))
        )
        if key is not None:
            lease, ticket = await _pin(state, principal, model, ticket, receive)
            if lease is None:
                raise _not_found(model)
        slot = lease.slot if lease is not None else None
        scope = prefix_scope(state, principal, lease)
        yield Placement(slot, scope, lease, ticket), release
    except BaseException:
        if ticket is None:
            state.active_by_tenant[tenant] -= 1
        release()
        raise


def _not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{model}` does not exist.",
        param="model",
        code="model_not_found",
    )


async def _locate(state: ApiState, principal: Principal, model: str):
    """The adapter's key for admission; 404 before any wait when the caller has none. A
    resolver that cannot locate gets the name back (and its acquire answers the 404)."""
    locate = getattr(state.resolver, "locate", None)
    if locate is None:
        return model
    key = await asyncio.to_thread(locate, principal, model)
    if key is None:
        raise _not_found(model)
    return key


def _gone(receive):
    """A coroutine function that returns once the client has disconnected."""
    if receive is None:
        return None

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return disconnected


def _refused(state: ApiState, exc: Refused) -> ApiError:
    """Admission's refusal, counted, in the one error shape."""
    state.metrics.rejections.labels(exc.reason).inc()
    return ApiError(exc.status, str(exc), code=exc.code, retry_after=exc.retry_after)


async def _turn(state: ApiState, waiting):
    """Await admission (`waiting`); its refusals in the one error shape."""
    try:
        return await waiting
    except Refused as exc:
        raise _refused(state, exc) from None
    except ClientGone:
        # Nobody reads this answer; 499 is the status proxies log for it.
        raise ApiError(499, "the client closed the request while it waited") from None


async def _pin(state: ApiState, principal: Principal, model: str, ticket, receive):
    """Pin the adapter's slot: (lease, ticket). When admission knows residency the pool is
    only tried, never waited on: if another call took the slot first, this call waits for
    its turn again rather than holding a worker thread while every slot is pinned."""
    tries = not isinstance(state.admission.residency, AllResident) and (
        "wait_s" in inspect.signature(state.resolver.acquire).parameters
    )  # a resolver whose engines pin slots themselves (replicas) has no pool to try
    first = ticket
    try:
        while True:
            started = time.monotonic()
            try:
                if tries:
                    lease = await state.resolver.acquire(principal, model, wait_s=0)
                else:
                    lease = await state.resolver.acquire(principal, model)
            except PoolExhausted:
                if not tries:
                    raise
                ticket = await _turn(
                    state, state.admission.again(ticket, _gone(receive))
                )
                continue
            ticket.loaded(time.monotonic() - started)
            return lease, ticket
    except BaseException:
        if ticket is not first:  # the caller only knows (and releases) the first
            ticket.release()
        raise


async def submit(
    state: ApiState,
    prefix: str,
    prompts,
    params: list[SamplingParams],
    placement: Placement,
):
    ids = [state.client.new_request_id(prefix) for _ in prompts]
    # Where admission's fair share gave this call the places of running requests, the
    # engine preempts some of these (one per request) as it queues the call's.
    displaced = placement.ticket.start(ids) if placement.ticket is not None else []
    submissions = [
        Submission(
            rid,
            prompt,
            p,
            placement.slot,
            placement.scope,
            placement.lease,
            tuple(displaced),
            placement.ticket.priority if placement.ticket is not None else 0,
        )
        for rid, prompt, p in zip(ids, prompts, params, strict=True)
    ]
    try:
        return await state.client.submit(submissions)
    except InvalidRequestError as exc:
        raise ApiError(400, str(exc)) from None
    except EngineDeadError as exc:
        raise engine_unavailable(exc) from None


def engine_unavailable(exc: EngineDeadError) -> ApiError:
    """The retryable 503 of a request whose engine is gone (stopped, or a lost replica)."""
    retry_after = max(1, round(getattr(exc, "retry_after_s", 5)))
    message = getattr(exc, "client_message", "the engine is not running")
    return ApiError(503, message, code="engine_unavailable", retry_after=retry_after)


def served_by(streams) -> dict[str, str]:
    """The `x-loraplex-replica` header: which engine replica ran the call (replicas only)."""
    replicas = sorted({s.replica for s in streams if getattr(s, "replica", None)})
    return {"x-loraplex-replica": ",".join(replicas)} if replicas else {}


async def collect(streams: list[OutputStream], results: list[ChoiceResult], timers):
    async for i, out in merge(streams):
        timers[i].observe(out)
        results[i].add(out)


async def collect_until_done(request, streams, results, timers, release) -> None:
    """Gather every output of a non-streaming call, or stop when the client leaves; then
    abort what still runs and unpin the slot. A lost engine answers the retryable 503."""
    try:
        await run_until_disconnect(request.receive, collect(streams, results, timers))
    except EngineDeadError as exc:
        raise engine_unavailable(exc) from None
    finally:
        for stream in streams:
            stream.close()
        release()


def fan_out(body: SamplingFields, prompts: list[list[int]]):
    """Each prompt n times; choice i*n + j gets seed + j so the n samples differ."""
    seeds = [
        None if body.seed is None else (body.seed + j) % 2**64 for j in range(body.n)
    ]
    return [(p, seeds[j]) for p in prompts for j in range(body.n)]


def streaming_response(
    events: AsyncIterator[bytes], streams: list[OutputStream], release
) -> StreamingResponse:
    """An SSE response whose cleanup (abort unfinished requests, unpin the slot) always runs.

    The status line is sent before the first token, so an engine lost mid-stream ends the
    stream with one `data: {"error": ...}` event in the one error shape (503, retryable).
    """

    def cleanup() -> None:
        for s in streams:
            s.close()
        release()

    return StreamingResponse(
        _until_engine_lost(events),
        media_type="text/event-stream",
        background=BackgroundTask(cleanup),
        headers={"Cache-Control": "no-cache", **served_by(streams)},
    )


async def _until_engine_lost(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield event
    except EngineDeadError as exc:
        yield sse(engine_unavailable(exc).body())
