"""Tokenizer (transformers' AutoTokenizer, GGUF included) and incremental detokenization."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers.decoders import DecodeStream

from services.engine.errors import InvalidRequestError, ModelLoadError

# Prompt tokens given to a detokenizer as context, so the first output token decodes as it
# would mid-text (leading-space handling of SentencePiece-style tokenizers).
_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    """Turns a stream of token ids into text without ever emitting a broken UTF-8 character.

    A token that ends inside a multi-byte character yields "" until the character completes
    (tokenizers' DecodeStream keeps the pending bytes).
    """

    def __init__(self, backend: Any, context_ids: list[int], skip_special_tokens: bool) -> None:
        self._backend = backend
        self._stream = DecodeStream(ids=context_ids, skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._backend, token_id) or ""


class Tokenizer:
    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self._backend = hf_tokenizer.backend_tokenizer
        self.vocab_size = len(hf_tokenizer)

    @classmethod
    def load(cls, path: str | Path, gguf_file: str | None = None) -> Tokenizer:
        from transformers import AutoTokenizer

        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            return cls(AutoTokenizer.from_pretrained(str(path), **kwargs))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load the tokenizer in {path}: {e}") from e

    def save(self, path: str | Path) -> None:
        self.hf.save_pretrained(str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids exactly as `tokenizer(text)` gives them (special tokens as the model adds them)."""
        return list(self.hf(text, add_special_tokens=add_special_tokens).input_ids)

    def bad_word_ids(self, word: str) -> list[tuple[int, ...]]:
        """The token sequences a bad word can take in generated text: alone and after a space."""
        forms = {tuple(self.hf(text, add_special_tokens=False).input_ids) for text in (word.lstrip(), " " + word.lstrip())}
        return sorted(ids for ids in forms if ids)

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            chat_template: str | None = None) -> list[int]:
        """The chat rendered by `chat_template` (Jinja text; default: the model's own), which
        also receives `tools` (transformers' form), tokenized."""
        if not (chat_template or self.hf.chat_template):
            raise InvalidRequestError("this model's tokenizer has no chat template")
        try:
            text = self.hf.apply_chat_template(messages, tools=tools or None, chat_template=chat_template,
                                               tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - Jinja's errors, or the template's own raise_exception: the chat's
            # shape is what a trusted template trips on (jinja2 is no declared dependency of ours to name them)
            raise InvalidRequestError(f"the chat template cannot render this chat: {e}") from e
        # The template already holds the special tokens (BOS and role markers).
        return list(self.hf(text, add_special_tokens=False).input_ids)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def detokenizer(self, prompt_ids: list[int], skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self._backend, prompt_ids[-_CONTEXT_TOKENS:], skip_special_tokens)
