"""LLM: the offline API, shaped like vLLM's, for batch generation with many adapters at once.

    llm = LLM(model="path/to/hf_dir", max_lora_rank=64, max_loras=8)
    outs = llm.generate(["prompt a", "prompt b"], SamplingParams(max_tokens=16, temperature=0.0),
                        adapters=["path/to/peft_adapter_dir", None])

Requests for every adapter run in one in-flight batch. When a call names more distinct adapters
than the engine has slots, requests whose adapter has no slot wait until a slot is no longer used
by any running request, then the least recently used idle slot is reloaded.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from loraplex.adapters_registry import load_adapter_dir
from loraplex.platform import (
    Engine,
    EngineConfig,
    FinishReason,
    LoraWeights,
    SamplingParams,
    TokenLogprobs,
)


@dataclass(frozen=True)
class GenerationOutput:
    """The finished result of one prompt."""

    prompt: str | list[int]
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    adapter: str | None
    logprobs: list[TokenLogprobs]


class LLM:
    """A base model and its adapters, for offline generation.

    :param model: a Hugging Face checkpoint directory (Llama, Mistral, Qwen2, Qwen3).
    :param max_lora_rank: the largest adapter rank accepted.
    :param max_loras: adapter slots in the engine; more adapters than this take turns.
    :param engine_options: any other EngineConfig field (dtype, device, max_num_seqs, ...).
    """

    def __init__(
        self,
        model: str | Path,
        max_lora_rank: int = 64,
        max_loras: int = 8,
        **engine_options,
    ):
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(model), local_files_only=True
        )
        config = EngineConfig(
            model=str(model),
            max_lora_rank=max_lora_rank,
            max_loras=max_loras,
            **engine_options,
        )
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self.engine = Engine(config, tokenizer=backend)
        self._adapters: dict[str, LoraWeights] = {}
        self._slots: OrderedDict[str, int] = (
            OrderedDict()
        )  # adapter key → slot, LRU first
        self._ids = itertools.count()

    def load_adapter(self, path: str | Path) -> str:
        """Validate an adapter directory now (not when its turn comes); returns its key."""
        key = str(Path(path).resolve())
        if key not in self._adapters:
            self._adapters[key] = load_adapter_dir(
                path, self.engine.spec, self.engine.config.max_lora_rank
            )
        return key

    def chat(
        self,
        conversations: Sequence[list[dict[str, str]]],
        sampling_params: SamplingParams | None = None,
        adapters: Sequence[str | Path | None] | None = None,
        use_tqdm: bool = False,
    ) -> list[GenerationOutput]:
        """Generate replies to chat conversations, rendered with the model's chat template."""
        # The template writes any BOS itself, so the rendered text is tokenized without extras.
        prompts = [
            self.tokenizer(
                self.tokenizer.apply_chat_template(
                    c, tokenize=False, add_generation_prompt=True
                ),
                add_special_tokens=False,
            )["input_ids"]
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, adapters, use_tqdm)

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: Sequence[str | Path | None] | None = None,
        use_tqdm: bool = False,
    ) -> list[GenerationOutput]:
        """Generate for every prompt, each with its own adapter (None = the base model).

        :param prompts: text, or token ids.
        :param sampling_params: one for all prompts, or one per prompt.
        :param adapters: one PEFT adapter directory (or None) per prompt.
        :raises AdapterInvalid: an adapter is invalid (before any generation starts).
        :raises InvalidRequestError: a prompt is too long or a parameter is out of range.
        """
        n = len(prompts)
        params = _per_prompt(sampling_params or SamplingParams(), n, "sampling_params")
        keys = [
            None if a is None else self.load_adapter(a)
            for a in _per_prompt(adapters, n, "adapters")
        ]
        token_ids = [p if isinstance(p, list) else self._encode(p) for p in prompts]
        pending = list(range(n))
        ids = {i: f"offline-{next(self._ids)}" for i in range(n)}
        index_of = {rid: i for i, rid in ids.items()}
        texts, tokens, logprobs = (
            [""] * n,
            [[] for _ in range(n)],
            [[] for _ in range(n)],
        )
        reasons: dict[int, FinishReason] = {}
        in_use: dict[str, int] = {}  # adapter key → unfinished requests using it
        bar = tqdm(total=n, desc="generating", disable=not use_tqdm)
        try:
            while pending or self.engine.has_unfinished_requests:
                while pending:
                    i = pending[0]
                    slot = self._acquire(keys[i], in_use)
                    if slot is False:
                        break  # every slot is busy: wait for running requests to finish
                    self.engine.add_request(ids[i], token_ids[i], params[i], slot)
                    pending.pop(0)
                for out in self.engine.step():
                    i = index_of[out.request_id]
                    texts[i] += out.text_delta
                    tokens[i].extend(out.new_token_ids)
                    logprobs[i].extend(out.logprobs)
                    if out.finished:
                        reasons[i] = out.finish_reason
                        if keys[i] is not None:
                            in_use[keys[i]] -= 1
                        bar.update(1)
        except BaseException:
            for rid in ids.values():
                self.engine.abort(rid)
            while self.engine.has_unfinished_requests:
                self.engine.step()
            raise
        finally:
            bar.close()
        return [
            GenerationOutput(
                prompts[i],
                token_ids[i],
                texts[i],
                tokens[i],
                reasons[i],
                None if keys[i] is None else str(adapters[i]),
                logprobs[i],
            )
            for i in range(n)
        ]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def _acquire(self, key: str | None, in_use: dict[str, int]) -> int | None | bool:
        """The slot for an adapter (loading it if needed), None for the base, False if all busy."""
        if key is None:
            return None
        if key not in self._slots:
            num_slots = self.engine.config.max_loras
            if num_slots == 0:
                raise ValueError(
                    "this LLM was built with max_loras=0, so it serves no adapters"
                )
            taken = set(self._slots.values())
            free = [s for s in range(num_slots) if s not in taken]
            if free:
                slot = free[0]
            else:
                idle = next((k for k in self._slots if in_use.get(k, 0) == 0), None)
                if idle is None:
                    return False
                slot = self._slots.pop(idle)
            self.engine.load_adapter(slot, self._adapters[key])
            self._slots[key] = slot
        self._slots.move_to_end(key)
        in_use[key] = in_use.get(key, 0) + 1
        return self._slots[key]


def _per_prompt(value, n: int, name: str) -> list:
    if value is None:
        return [None] * n
    if isinstance(value, SamplingParams | str | Path):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} prompts")
    return values
