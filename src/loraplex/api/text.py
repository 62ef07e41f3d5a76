"""Text ↔ tokens for the API: prompts, chat templates and the text of single tokens."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from .errors import ApiError


class TextProcessor:
    """Wraps the base model's tokenizer (chat templates render in transformers' sandbox)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise ApiError(400, "this model has no chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # noqa: BLE001 - template errors are the caller's input
            raise ApiError(
                400, f"the chat template rejected the messages: {exc}"
            ) from None
        # The template writes any BOS itself.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])
