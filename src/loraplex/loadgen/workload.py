"""What a benchmark sends: lengths, prompts, adapter popularity, tenants and arrival times.

Everything is drawn from one seeded `random.Random` before the first request leaves, so the
same options and seed give the same workload, whatever the server does.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Common English words for text prompts: most tokenizers give each about one token.
_TEXT = (
    "the of and to in is you that it he was for on are as with his they at be this "
    "have from or one had by word but not what all were we when your can said there "
    "use an each which she do how their if will up other about out many then them "
    "these so some her would make like him into time has look two more write go see "
    "number no way could people my than first water been call who oil its now find"
)
_WORDS = _TEXT.split()


@dataclass(frozen=True)
class LengthDist:
    """A token-count distribution: `fixed`, `uniform` (inclusive) or `normal`; always >= 1."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        """`128`, `fixed:128`, `uniform:64:256` or `normal:128:32` (mean, deviation)."""
        parts = str(spec).split(":")
        try:
            if len(parts) == 1:
                return cls._checked("fixed", float(parts[0]))
            kind, *numbers = parts
            values = [float(n) for n in numbers]
        except ValueError:
            raise ValueError(f"length {spec!r}: numbers expected") from None
        if kind == "fixed" and len(values) == 1:
            return cls._checked(kind, values[0])
        if kind in ("uniform", "normal") and len(values) == 2:
            return cls._checked(kind, *values)
        raise ValueError(
            f"length {spec!r}: use N, fixed:N, uniform:LOW:HIGH or normal:MEAN:STD"
        )

    @classmethod
    def _checked(cls, kind: str, a: float, b: float = 0.0) -> LengthDist:
        if a < 1 or (kind == "uniform" and b < a) or (kind == "normal" and b < 0):
            raise ValueError(f"length {kind}:{a:g}:{b:g} is out of range")
        return cls(kind, a, b)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        if self.kind == "normal":
            return max(1, round(rng.gauss(self.a, self.b)))
        return int(self.a)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{self.a:g}"
        return f"{self.kind}:{self.a:g}:{self.b:g}"


POPULARITY_PRESETS = {"uniform": 0.0, "skewed": 1.0}


def popularity_weights(spec: str, count: int) -> list[float]:
    """Weights of `count` adapters: `uniform`, `skewed` (Zipf 1.0), `single`, or `zipf:ALPHA`.

    Zipf(alpha) gives the k-th adapter (from 1) weight 1 / k**alpha: alpha 0 is uniform.
    """
    if count < 1:
        return []
    if spec == "single":
        return [1.0] + [0.0] * (count - 1)
    if spec in POPULARITY_PRESETS:
        alpha = POPULARITY_PRESETS[spec]
    elif spec.startswith("zipf:"):
        try:
            alpha = float(spec[len("zipf:") :])
        except ValueError:
            raise ValueError(
                f"popularity {spec!r}: zipf:ALPHA needs a number"
            ) from None
        if alpha < 0:
            raise ValueError(f"popularity {spec!r}: alpha must be >= 0")
    else:
        raise ValueError(
            f"popularity {spec!r}: use uniform, skewed, single or zipf:ALPHA"
        )
    return [1.0 / (k**alpha) for k in range(1, count + 1)]


class WeightedChoice:
    """Draws indices with fixed weights in O(log n)."""

    def __init__(self, weights: Sequence[float]) -> None:
        if not weights or sum(weights) <= 0:
            raise ValueError("at least one positive weight is needed")
        self.cumulative = list(itertools.accumulate(weights))

    def draw(self, rng: random.Random) -> int:
        x = rng.random() * self.cumulative[-1]
        return min(bisect.bisect_right(self.cumulative, x), len(self.cumulative) - 1)


def adapter_names(prefix: str, count: int, start: int = 0) -> list[str]:
    """The names `loraplex bench adapters` gives: PREFIX0, PREFIX1, ..."""
    return [f"{prefix}{i}" for i in range(start, start + count)]


@dataclass(frozen=True)
class DatasetEntry:
    """One line of a JSONL dataset: a prompt (text or token ids) or chat messages."""

    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    output_len: int | None = None


def load_dataset(path: Path) -> list[DatasetEntry]:
    """Lines of `{"prompt": "..." | [ids]}` or `{"messages": [...]}`, optional `output_len`.

    :raises ValueError: naming the line at fault.
    """
    entries = []
    with Path(path).open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc})") from None
            if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
                raise ValueError(
                    f"{path}:{number}: needs exactly one of prompt, messages"
                )
            out = row.get("output_len", row.get("max_tokens"))
            if out is not None and (not isinstance(out, int) or out < 1):
                raise ValueError(f"{path}:{number}: output_len must be an int >= 1")
            entries.append(DatasetEntry(row.get("prompt"), row.get("messages"), out))
    if not entries:
        raise ValueError(f"{path}: no requests in the dataset")
    return entries


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: who, which model, what, and when (seconds after the start)."""

    index: int
    tenant: int  # index into the API keys
    model: str
    kind: str  # "base", "hot" or "cold"
    prompt: str | list[int] | None
    messages: list[dict] | None
    max_tokens: int
    arrival_s: float


@dataclass(frozen=True)
class WorkloadConfig:
    """How requests are drawn; see `loraplex bench serve --help` for each field."""

    endpoint: str = "completions"  # or "chat"
    base_model: str = ""
    adapters: tuple[str, ...] = ()
    cold_adapters: tuple[str, ...] = ()
    popularity: str = "uniform"
    cold_share: float = 0.0
    base_share: float = 0.0
    num_tenants: int = 1
    tenant_weights: tuple[float, ...] = ()
    prompt_len: LengthDist = LengthDist("fixed", 32)
    output_len: LengthDist = LengthDist("fixed", 32)
    vocab_size: int = 0  # > 0: prompts are token ids in [0, vocab_size) (completions)
    dataset: tuple[DatasetEntry, ...] = ()
    request_rate: float = math.inf
    arrival: str = "poisson"  # or "constant"
    seed: int = 0


def generate(config: WorkloadConfig, limit: int | None) -> Iterator[RequestSpec]:
    """Requests in arrival order; `limit` None means without end (a duration stops it)."""
    rng = random.Random(config.seed)
    hot = None
    if config.adapters:
        hot = WeightedChoice(
            popularity_weights(config.popularity, len(config.adapters))
        )
    weights = config.tenant_weights or (1.0,) * config.num_tenants
    if len(weights) != config.num_tenants:
        raise ValueError(
            f"{len(weights)} tenant weights for {config.num_tenants} API keys"
        )
    tenants = WeightedChoice(weights)
    cold = itertools.cycle(config.cold_adapters) if config.cold_adapters else None
    arrival = 0.0
    for index in itertools.count() if limit is None else range(limit):
        if index and math.isfinite(config.request_rate):
            gap = 1.0 / config.request_rate
            arrival += (
                rng.expovariate(config.request_rate)
                if config.arrival == "poisson"
                else gap
            )
        kind, model = _model(config, rng, hot, cold)
        prompt, messages, out = _prompt(config, rng)
        yield RequestSpec(
            index, tenants.draw(rng), model, kind, prompt, messages, out, arrival
        )


def _model(config: WorkloadConfig, rng: random.Random, hot, cold) -> tuple[str, str]:
    x = rng.random()
    if cold is not None and x < config.cold_share:
        return "cold", next(cold)  # round robin: each cold adapter as rarely as can be
    if hot is None or x < config.cold_share + config.base_share:
        return "base", config.base_model
    return "hot", config.adapters[hot.draw(rng)]


def _prompt(config: WorkloadConfig, rng: random.Random):
    if config.dataset:
        entry = config.dataset[rng.randrange(len(config.dataset))]
        out = entry.output_len or config.output_len.sample(rng)
        if config.endpoint == "chat" and entry.messages is None:
            text = entry.prompt if isinstance(entry.prompt, str) else None
            if text is None:
                raise ValueError("chat needs text prompts or messages in the dataset")
            return None, [{"role": "user", "content": text}], out
        if config.endpoint == "completions" and entry.prompt is None:
            raise ValueError("completions need `prompt` in every dataset line")
        return entry.prompt, entry.messages, out
    length = config.prompt_len.sample(rng)
    out = config.output_len.sample(rng)
    if config.vocab_size > 0 and config.endpoint == "completions":
        return [rng.randrange(config.vocab_size) for _ in range(length)], None, out
    text = " ".join(rng.choice(_WORDS) for _ in range(length))
    if config.endpoint == "chat":
        return None, [{"role": "user", "content": text}], out
    return text, None, out
