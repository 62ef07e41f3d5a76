"""The state of one generation request, and the sampling parameters it asked for. No torch here."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20


class FinishReason(enum.StrEnum):
    """Why a request ended, in OpenAI's words."""

    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by the caller or by shutdown


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, shaped like vLLM's.

    :param max_tokens: tokens to generate at most.
    :param temperature: 0 means greedy.
    :param top_p: nucleus sampling mass in (0, 1].
    :param top_k: keep the k most likely tokens; 0 keeps all.
    :param min_p: drop tokens below min_p times the most likely token's probability.
    :param seed: the same seed gives the same tokens whatever else is in the batch.
    :param stop: strings that end generation; the matched string is not part of the text.
    :param stop_token_ids: token ids that end generation (besides the model's EOS).
    :param ignore_eos: keep generating past EOS (benchmarks).
    :param logprobs: return the chosen token's log-probability and this many top alternatives.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(
                f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(
                f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}"
            )
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            problems.append(
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop strings must be non-empty strings")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(eq=False)
class Request:
    """One generation: its tokens, how far the KV cache has caught up, and how it ends.

    `num_computed_tokens` catches up with `num_tokens` under the scheduler's token budget; a
    prefill is the catching up of the prompt, a decode the catching up of one sampled token.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    seed: int  # the sampling seed: the request's own, or one drawn for it at arrival
    slot: int | None = None  # LoRA slot; None = base model only
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # Lower is scheduled first (the API: 0 for tenants within their fair share).
    priority: int = 0
    # time.monotonic() when queued, first scheduled and first sampled: queue and prefill time
    queued_at: float = 0.0
    scheduled_at: float | None = None
    first_token_at: float | None = None
    # Prefix caching: the chain root (None = never cached), the hashes of the full blocks of
    # prompt + output known so far (kept across preemptions: the tokens do not change), and the
    # prompt tokens its first admission found in the cache (OpenAI's `cached_tokens`).
    cache_root: bytes | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens at positions start:stop of prompt + output."""
        prompt_len = len(self.prompt_token_ids)
        if stop <= prompt_len:
            return self.prompt_token_ids[start:stop]
        head = self.prompt_token_ids[start:] if start < prompt_len else []
        return (
            head + self.output_token_ids[max(start - prompt_len, 0) : stop - prompt_len]
        )

    def token_at(self, position: int) -> int:
        """The token at `position` of prompt + output: a decode step's one input token."""
        prompt_len = len(self.prompt_token_ids)
        if position < prompt_len:
            return self.prompt_token_ids[position]
        return self.output_token_ids[position - prompt_len]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def check_finished(self) -> FinishReason | None:
        """Why the request must stop after its latest output token, if it must."""
        last = self.output_token_ids[-1]
        if last in self.sampling.stop_token_ids:
            return FinishReason.STOP
        if not self.sampling.ignore_eos and last in self.eos_token_ids:
            return FinishReason.STOP
        if len(self.output_token_ids) >= self.sampling.max_tokens:
            return FinishReason.LENGTH
        if self.max_model_len and self.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
