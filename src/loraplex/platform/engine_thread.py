"""EngineThread: the Engine on a thread of its own, driven through thread-safe calls.

Every mutation of engine state (new requests, aborts, adapter slot writes) runs on the engine
thread between two steps; callers hand it over as a function and get a Future back. Each
request's outputs go to the callback registered with it, called on the engine thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from .engine import Engine, EngineStats
from .outputs import RequestOutput
from .prefix_cache import PrefixScope
from .request import FinishReason, SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
OutputCallback = Callable[[RequestOutput], None]


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (shut down, or a step failed); nothing more will run."""


class EngineThread:
    """Owns an Engine; `call`, `add_request` and `abort` may be used from any thread."""

    def __init__(self, engine: Engine, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[tuple[Callable[[Engine], object], Future]] = (
            queue.SimpleQueue()
        )
        self._callbacks: dict[str, OutputCallback] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._closed = False  # set, under _lock, once queued calls can no longer run
        self._lock = threading.Lock()
        self._idle_wait_s = idle_wait_s
        self._stats = engine.stats()
        self.steps = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name="loraplex-engine", daemon=True
        )

    def start(self) -> EngineThread:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return (
            self._thread.is_alive()
            and self.error is None
            and not self._stopping.is_set()
        )

    def call(self, fn: Callable[[Engine], T]) -> Future[T]:
        """Run fn(engine) on the engine thread between two steps; its result or error in a Future."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed or self._stopping.is_set():
                future.set_exception(EngineDeadError(self._death_reason()))
                return future
            self._inbox.put((fn, future))
        self._wake.set()
        return future

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        slot: int | None,
        on_output: OutputCallback,
        scope: PrefixScope | None = None,
        priority: int = 0,
    ) -> Future[None]:
        """Queue a request; its outputs go to `on_output`. The Future fails on invalid input.

        `scope`, `priority`: as Engine.add_request.
        """

        def add(engine: Engine) -> None:
            engine.add_request(
                request_id, prompt_token_ids, sampling, slot, scope, priority
            )
            self._callbacks[request_id] = on_output

        return self.call(add)

    def abort(self, request_id: str) -> Future[bool]:
        """Stop a request; its callback still receives the final output (reason abort)."""
        return self.call(lambda engine: engine.abort(request_id))

    def stats(self) -> EngineStats:
        """A snapshot of the engine's load, refreshed after every step."""
        return self._stats

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop after the current step; unfinished requests end with finish_reason abort."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            times = self.engine.step_times
            while not self._stopping.is_set():
                started = time.perf_counter()
                self._drain_inbox()
                if not self.engine.has_unfinished_requests:
                    waited = time.perf_counter()
                    self._wake.wait(self._idle_wait_s)
                    self._wake.clear()
                    times.record_thread("calls", waited - started)
                    times.record_thread("idle", time.perf_counter() - waited)
                    continue
                stepping = time.perf_counter()
                times.record_thread("calls", stepping - started)
                outputs = self.engine.step()
                dispatching = time.perf_counter()
                self._dispatch(outputs)
                times.record_thread("dispatch", time.perf_counter() - dispatching)
                self.steps += 1
                self._stats = self.engine.stats()
        except (
            BaseException
        ) as exc:  # a failed step leaves the engine in an unknown state
            log.exception("engine thread stopped: a step failed")
            self.error = exc
        finally:
            self._shut_down()

    def _drain_inbox(self) -> None:
        ran = False
        while True:
            try:
                fn, future = self._inbox.get_nowait()
            except queue.Empty:
                # Calls change what the stats show (aborts, a dropped cache) while idle.
                if ran:
                    self._stats = self.engine.stats()
                return
            ran = True
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(self.engine))
            except Exception as exc:  # noqa: BLE001 - the caller's error, handed to the caller
                future.set_exception(exc)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            callback = self._callbacks.get(out.request_id)
            if out.finished:
                self._callbacks.pop(out.request_id, None)
            if callback is not None:
                try:
                    callback(out)
                except Exception:
                    log.exception("output callback for %s failed", out.request_id)

    def _shut_down(self) -> None:
        """Fail queued calls and end every request still waiting for output."""
        reason = EngineDeadError(self._death_reason())
        with self._lock:
            self._closed = True
        while True:
            try:
                _, future = self._inbox.get_nowait()
            except queue.Empty:
                break
            if future.set_running_or_notify_cancel():
                future.set_exception(reason)
        for request_id, callback in list(self._callbacks.items()):
            try:
                callback(RequestOutput(request_id, [], "", True, FinishReason.ABORT))
            except Exception:
                log.exception("output callback for %s failed", request_id)
        self._callbacks.clear()
        try:
            self.engine.close()  # tensor-parallel workers, if any
        except Exception:
            log.exception("closing the engine failed")

    def _death_reason(self) -> str:
        if self.error is not None:
            return f"the engine stopped after an error: {self.error!r}"
        return "the engine is shut down"
