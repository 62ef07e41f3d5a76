"""RequestTimer: the latency bookkeeping of one engine request (one choice of a call), from
the call's arrival (stamped by ArrivalStamp) to its last token."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from loraplex.platform import RequestOutput

if TYPE_CHECKING:
    from .metrics import ApiMetrics


class RequestTimer:
    """Observes TTFT, inter-token latency and end-to-end latency, and splits the time to
    first token into setup (arrival to queued in the engine), the engine's queue and
    prefill, and delivery (the rest: the first token's way back to the API)."""

    def __init__(
        self, metrics: ApiMetrics, tenant: str, arrived: float | None = None
    ) -> None:
        self.metrics = metrics
        self.tenant = tenant
        self.started = time.monotonic() if arrived is None else arrived
        self.setup_s: float | None = None
        self.ttft_s: float | None = None
        self.last_token: float | None = None
        # Per-token series, looked up once: `labels()` takes a lock and hashes every call.
        name = metrics.model_name
        self._itl = metrics.itl.labels(name)
        self._tokens = metrics.generation_tokens.labels(name)
        self._tenant_tokens = metrics.tenant_tokens.labels(tenant, "generated")

    def queued(self) -> None:
        """The call's engine request is queued: its setup time ends."""
        self.setup_s = time.monotonic() - self.started
        self.metrics.setup_time.labels(self.tenant).observe(self.setup_s)

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        tokens = len(out.new_token_ids)
        if tokens:
            if self.last_token is None:
                self.ttft_s = now - self.started
                self.metrics.ttft.labels(self.metrics.model_name).observe(self.ttft_s)
            else:
                self._itl.observe((now - self.last_token) / tokens)
            self.last_token = now
            self._tokens.inc(tokens)
            self._tenant_tokens.inc(tokens)
        if out.finished:
            self._finished(out, now)

    def _finished(self, out: RequestOutput, now: float) -> None:
        m, name = self.metrics, self.metrics.model_name
        m.e2e.labels(name).observe(now - self.started)
        m.prompt_tokens.labels(name).inc(out.num_prompt_tokens)
        m.tenant_tokens.labels(self.tenant, "prompt").inc(out.num_prompt_tokens)
        m.tenant_cache.add(self.tenant, out.num_prompt_tokens, out.num_cached_tokens)
        if out.queue_s is not None:
            m.queue_time.labels(self.tenant).observe(out.queue_s)
        if out.prefill_s is not None:
            m.prefill_time.labels(self.tenant).observe(out.prefill_s)
            if self.ttft_s is not None and self.setup_s is not None:
                # The parts overlap by the hand-over's return to the API: clamp at 0.
                rest = self.ttft_s - self.setup_s - (out.queue_s or 0.0) - out.prefill_s
                m.delivery_time.labels(self.tenant).observe(max(0.0, rest))
        reason = out.finish_reason.value if out.finish_reason else "abort"
        m.success.labels(name, reason).inc()
