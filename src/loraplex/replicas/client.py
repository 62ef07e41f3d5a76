"""ReplicaClient: the front's InferenceClient over the engine replicas' DeploymentHandle.

One API call is one streaming handle call (`handle.options(stream=True,
multiplexed_model_id=<adapter id>)`), so Ray Serve routes it to a replica that holds its
adapter when one does, and its n choices share that replica's batch. The replica's first
answer says whether it queued every request; a call that no replica could take (one died
while it was routed) is tried again, since nothing has been generated yet. A replica lost
after that ends the call's streams with ReplicaLost, the retryable 503 of the API.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence

from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import RayServeException

from loraplex.api.engine_client import Submission
from loraplex.api.output_collector import OutputCollector
from loraplex.platform import (
    EngineDeadError,
    EngineStats,
    PrefixScope,
    RequestOutput,
    merge_seconds,
    merge_steps,
)

from .board import FleetView
from .wire import Accepted, Job, Refused, RemoteRequest

log = logging.getLogger(__name__)
_RAY_ERRORS = (RayError, RayServeException)


class ReplicaLost(EngineDeadError):
    """The replica running (or taking) a request died; another one will take a retry."""

    retry_after_s = 1.0
    client_message = "the engine replica serving this request was lost; retry it"


class ReplicaStream:
    """One request's outputs from its replica (the OutputStream of the API)."""

    def __init__(self, call: _Call, replica: str) -> None:
        self.call = call
        self.replica = replica
        self.outputs = OutputCollector()
        self.finished = False

    def __aiter__(self) -> ReplicaStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            out = await self.outputs.get()
        except Exception:  # the call ended early: this stream is over
            self._finish()
            raise
        if out.finished:
            self._finish()
        return out

    def close(self) -> None:
        """Abort: cancels the whole call on its replica (every stream of a call closes
        together in the API)."""
        if not self.finished:
            self._finish()
            self.call.cancel()

    def _finish(self) -> None:
        self.finished = True
        self.call.client.num_active -= 1


class _Call:
    """One streaming handle call and the streams it feeds."""

    def __init__(self, client: ReplicaClient, generator, replica: str, n: int) -> None:
        self.client = client
        self.generator = generator
        self.streams = [ReplicaStream(self, replica) for _ in range(n)]
        self.cancelled = False
        self.task = asyncio.create_task(self._pump())

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.generator.cancel()

    async def _pump(self) -> None:
        error: Exception | None = None
        try:
            async for i, out in self.generator:
                self.streams[i].outputs.put(out)
        except asyncio.CancelledError:
            raise
        except _RAY_ERRORS as exc:
            if not self.cancelled:
                log.warning("lost a replica mid-call: %s", str(exc).splitlines()[0])
            error = ReplicaLost(str(exc).splitlines()[0])
        except Exception as exc:  # handed to the streams, never lost
            log.exception("replica call failed")
            error = ReplicaLost(repr(exc))
        for stream in self.streams:  # a call that ends early must not read as finished
            if not stream.finished:
                stream.outputs.fail(error or ReplicaLost("the replica call ended"))


class ReplicaClient:
    """Submits each API call to the engine replicas as one streaming Ray Serve call."""

    can_preempt = (
        False  # each replica's engine serves its own queue first come, first served
    )

    def __init__(self, handle, view: FleetView, attempts: int = 3) -> None:
        self.handle = handle
        self.view = view
        self.attempts = attempts
        self.num_active = 0  # touched on the event loop only
        self._ids = itertools.count()
        self._calls: set[_Call] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # the API's, set by submit

    @property
    def alive(self) -> bool:
        """At least one replica reports a running engine."""
        return any(r.alive for r in self.view.reports())

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    async def submit(self, submissions: Sequence[Submission]) -> list[ReplicaStream]:
        """Queue a call's requests on one replica (all or none).

        :raises InvalidRequestError: the engine refused a request.
        :raises RegistryError: the replica could not load the adapter (PoolExhausted, ...).
        :raises ReplicaLost: no replica took the call in `attempts` tries.
        """
        self._loop = asyncio.get_running_loop()
        lease = submissions[0].lease if submissions else None
        source = getattr(lease, "source", None)
        job = Job(
            tuple(
                RemoteRequest(s.request_id, s.prompt_token_ids, s.sampling, s.scope)
                for s in submissions
            ),
            source,
        )
        options = self.handle.options(
            stream=True, multiplexed_model_id=source.key if source else ""
        )
        for attempt in range(self.attempts):
            generator = options.generate.remote(job)
            try:
                first = await generator.__anext__()
            except asyncio.CancelledError:
                generator.cancel()
                raise
            except RayTaskError as exc:  # a bug on the replica, not a lost replica
                raise ReplicaLost(f"the replica failed: {exc.cause!r}") from None
            except (*_RAY_ERRORS, StopAsyncIteration) as exc:
                log.warning("no replica took a call (try %d): %r", attempt + 1, exc)
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if isinstance(first, Refused):
                raise first.error
            assert isinstance(first, Accepted)
            call = _Call(self, generator, first.replica_id, len(submissions))
            self.num_active += len(submissions)
            self._calls.add(call)
            call.task.add_done_callback(lambda _, c=call: self._calls.discard(c))
            return call.streams
        raise ReplicaLost(f"no engine replica took the call in {self.attempts} tries")

    def stats(self) -> EngineStats:
        """The replicas' engine stats, summed (slots are adapter ids)."""
        reports = [r for r in self.view.reports() if r.stats is not None]
        if not reports:
            return EngineStats(0, 0, 0, 0, 0)
        fields = (
            "num_running",
            "num_waiting",
            "num_free_kv_blocks",
            "num_kv_blocks",
            "num_preemptions",
            "prefix_cache_queries",
            "prefix_cache_hits",
            "num_cached_kv_blocks",
            "num_evictable_kv_blocks",
        )
        totals = {f: sum(getattr(r.stats, f) for r in reports) for f in fields}
        running = tuple(s for r in reports for s in r.stats.running_slots)
        waiting = tuple(s for r in reports for s in r.stats.waiting_slots)
        return EngineStats(
            **totals,
            running_slots=running,
            waiting_slots=waiting,
            step_totals=merge_steps(*(r.stats.step_totals for r in reports)),
            thread_seconds=merge_seconds(*(r.stats.thread_seconds for r in reports)),
        )

    def forget_prefix(self, scope: PrefixScope) -> None:
        self.view.post("forget_prefix", scope)

    def stop(self) -> None:
        """Abort every call still running (the drain's last step, from any thread)."""
        if self._loop is None or self._loop.is_closed():
            return
        for call in list(self._calls):
            self._loop.call_soon_threadsafe(call.cancel)
