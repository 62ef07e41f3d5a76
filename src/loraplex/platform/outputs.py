"""RequestOutput and the OutputProcessor that turns sampled tokens into text, stops and finishes."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from .request import FinishReason, Request
from .sampler import TokenLogprobs
from .scheduler import RequestUpdate, Scheduler

_PROMPT_CONTEXT_TOKENS = (
    6  # enough prompt tail for the first token's leading space to decode right
)


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request (a delta, not the whole text so far)."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # On the last output: seconds queued in the engine before first scheduled, and from
    # then to the first token (None: it never got that far).
    queue_s: float | None = None
    prefill_s: float | None = None


class IncrementalDetokenizer:
    """Decodes one token at a time; holds back text that could still become a stop string."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...]
    ):
        self.tokenizer = tokenizer
        self.stream = DecodeStream(
            ids=prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:], skip_special_tokens=True
        )
        self.stop = stop
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0

    def step(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (text safe to emit now, whether a stop string matched)."""
        piece = self.stream.step(self.tokenizer, token_id) or ""
        if not self.stop:  # nothing held back: the piece is the delta, no text to keep
            return piece, False
        before = len(self.text)
        self.text += piece
        search_from = max(before - self.hold_back, 0)
        hits = [
            i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0
        ]
        if hits:
            self.text = self.text[: min(hits)]
            return self.flush(), True
        end = len(self.text) - self.hold_back
        if end <= self.emitted:
            return "", False
        delta, self.emitted = self.text[self.emitted : end], end
        return delta, False

    def flush(self) -> str:
        """All text not yet emitted (at the end of the request)."""
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta


class OutputProcessor:
    """Detokenizes each request's new tokens and finishes requests whose stop string appeared."""

    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer | None) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}

    def add(self, request: Request) -> None:
        if self.tokenizer is not None:
            self.detokenizers[request.request_id] = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, request.sampling.stop
            )

    def process(
        self, updates: list[RequestUpdate], logprobs: list[TokenLogprobs | None]
    ) -> list[RequestOutput]:
        outputs = []
        tokenizer, detokenizers = self.tokenizer, self.detokenizers
        for request, token, reason, sample_index in updates:
            text = ""
            detok = detokenizers.get(request.request_id)
            if detok is not None and token is not None:
                if not detok.stop:  # detok.step's first branch, inlined: B calls a step
                    text = detok.stream.step(tokenizer, token) or ""
                else:
                    text, stopped = detok.step(token)
                    if stopped and reason is None:
                        reason = FinishReason.STOP
                        self.scheduler.finish(request, reason)
            row = logprobs[sample_index] if sample_index is not None else None
            outputs.append(self._output(request, token, text, reason, row))
        return outputs

    def aborted(self, request: Request) -> RequestOutput:
        return self._output(request, None, "", FinishReason.ABORT, None)

    def _output(
        self,
        request: Request,
        token: int | None,
        text: str,
        reason: FinishReason | None,
        logprobs: TokenLogprobs | None,
    ) -> RequestOutput:
        if reason is not None:
            detok = self.detokenizers.pop(request.request_id, None)
            text += detok.flush() if detok is not None else ""
        # Positional, in field order: keywords cost a third more, and this runs B times a step.
        return RequestOutput(
            request.request_id,
            [] if token is None else [token],  # new_token_ids
            text,  # text_delta
            reason is not None,  # finished
            reason,
            [] if logprobs is None else [logprobs],
            len(request.prompt_token_ids),
            len(request.output_token_ids),
            request.num_cached_tokens,
            *(_phase_times(request) if reason is not None else ()),
        )


def _phase_times(request: Request) -> tuple[float | None, float | None]:
    """(queue_s, prefill_s) of a request that ends."""
    scheduled, first = request.scheduled_at, request.first_token_at
    if scheduled is None:
        return None, None
    return scheduled - request.queued_at, None if first is None else first - scheduled
