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
        before = len(self.text)
        self.text += self.stream.step(self.tokenizer, token_id) or ""
        if self.stop:
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
        for update in updates:
            request, reason = update.request, update.finish_reason
            text = ""
            detok = self.detokenizers.get(request.request_id)
            if detok is not None and update.new_token_id is not None:
                text, stopped = detok.step(update.new_token_id)
                if stopped and reason is None:
                    reason = FinishReason.STOP
                    self.scheduler.finish(request, reason)
            row = (
                logprobs[update.sample_index]
                if update.sample_index is not None
                else None
            )
            outputs.append(
                self._output(request, [update.new_token_id], text, reason, row)
            )
        return outputs

    def aborted(self, request: Request) -> RequestOutput:
        return self._output(request, [], "", FinishReason.ABORT, None)

    def _output(
        self,
        request: Request,
        tokens: list[int | None],
        text: str,
        reason: FinishReason | None,
        logprobs: TokenLogprobs | None,
    ) -> RequestOutput:
        if reason is not None:
            detok = self.detokenizers.pop(request.request_id, None)
            text += detok.flush() if detok is not None else ""
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[t for t in tokens if t is not None],
            text_delta=text,
            finished=reason is not None,
            finish_reason=reason,
            logprobs=[logprobs] if logprobs is not None else [],
            num_prompt_tokens=len(request.prompt_token_ids),
            num_output_tokens=len(request.output_token_ids),
            num_cached_tokens=request.num_cached_tokens,
        )
