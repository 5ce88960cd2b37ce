"""Sampling parameters of one request, validated once when the request arrives.

Semantics follow vLLM's `SamplingParams`, so users and their benchmarks carry over:
temperature 0 (anything below 1e-5) means greedy; top_k of -1 (or 0) and top_p of 1 disable those filters;
repetition_penalty applies to prompt and output tokens (HF semantics), presence and
frequency penalties to output tokens only (OpenAI semantics).

Structured output (`StructuredOutputParams`, vLLM's options) constrains what may be sampled;
this module checks only its shape, services/engine/structured_output.py compiles it.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from services.engine.errors import InvalidRequestError

# Bounds at the edge: one bad request must never take down an engine that serves everyone.
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_LEN = 1024
MAX_LOGIT_BIAS = 1024  # entries
MAX_GRAMMAR_CHARS = 64 * 1024  # a schema, regex or grammar
MAX_CHOICES = 256
MAX_ALLOWED_TOKEN_IDS = 1 << 17
MAX_BAD_WORDS = 64


@dataclass(frozen=True)
class StructuredOutputParams:
    """Exactly one constraint on the output, as vLLM names them.

    json_schema: a JSON schema (JSON text or a dict); json_object: any JSON object; regex: the
    whole output matches it; grammar: EBNF (xgrammar's dialect, root rule `root`); choice:
    the output is exactly one of these strings.
    """

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json_schema, Mapping):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        self._validate()

    @property
    def kind(self) -> str:
        """Which constraint is set: "json_schema", "json_object", "regex", "grammar" or "choice"."""
        return self.key[0]

    @property
    def key(self) -> tuple[str, str]:
        """(kind, spec text): what a compiled grammar is cached under (with the tokenizer)."""
        if self.json_schema is not None:
            return ("json_schema", self.json_schema)
        if self.json_object:
            return ("json_object", "")
        if self.regex is not None:
            return ("regex", self.regex)
        if self.grammar is not None:
            return ("grammar", self.grammar)
        return ("choice", json.dumps(self.choice))

    def _validate(self) -> None:
        given = [self.json_schema is not None, self.json_object, self.regex is not None,
                 self.grammar is not None, self.choice is not None]
        if sum(given) != 1:
            raise InvalidRequestError(
                "structured output takes exactly one of json_schema, json_object, regex, grammar, choice; "
                f"got {sum(given)}"
            )
        for name in ("json_schema", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not 0 < len(value) <= MAX_GRAMMAR_CHARS):
                raise InvalidRequestError(f"{name} must be a non-empty string of at most {MAX_GRAMMAR_CHARS} characters")
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except RecursionError as e:
                raise InvalidRequestError("json_schema is nested too deeply") from e
            except ValueError as e:
                raise InvalidRequestError(f"json_schema is not valid JSON: {e}") from e
            if not isinstance(schema, dict):
                raise InvalidRequestError("json_schema must be a JSON object")
        if self.choice is not None:
            if not 0 < len(self.choice) <= MAX_CHOICES:
                raise InvalidRequestError(f"choice takes 1 to {MAX_CHOICES} strings, got {len(self.choice)}")
            if any(not isinstance(c, str) or not 0 < len(c) <= MAX_STOP_STRING_LEN for c in self.choice):
                raise InvalidRequestError(f"choices must be non-empty strings of at most {MAX_STOP_STRING_LEN} characters")


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Seeded requests are reproducible however they are batched, chunked or preempted: the
    # randomness of a sampled token is a pure function of (seed, sequence index, output position).
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    # Number of most likely tokens (from the model's raw distribution) to return per position.
    logprobs: int | None = None
    # The same for every prompt position after the first (the prompt token's logprob, its rank
    # and the top N), computed where the prompt is (services/engine/prompt_logprobs.py). Such a
    # request reads nothing from the prefix cache: cached positions have no logits.
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    # Salted into the first block hash: requests with different salts never share cached KV.
    cache_salt: str | None = None
    # Only tokens the constraint allows are sampled; the sequence stops when it is complete.
    structured_output: StructuredOutputParams | None = None
    # (token id, bias) pairs added to the logits before sampling; a dict is accepted too.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Only these token ids may be sampled (None: any). Applied with logit_bias, before the grammar.
    allowed_token_ids: tuple[int, ...] | None = None
    # Words never generated (vLLM's semantics): the engine tokenizes each, with and without a
    # leading space; a one-token word is banned outright, a longer one's last token is banned
    # where the output so far ends with the word's other tokens.
    bad_words: tuple[str, ...] = ()
    # Speculative decoding where the engine runs it (its output is the same either way);
    # False opts this request out, e.g. for latency measurements without it.
    speculative: bool = True

    def __post_init__(self) -> None:
        # Accept lists and dicts from callers (JSON, CLI) but store immutable tuples.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(sorted(set(self.allowed_token_ids))))
        object.__setattr__(self, "bad_words", (self.bad_words,) if isinstance(self.bad_words, str) else tuple(self.bad_words))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((t, float(b)) for t, b in dict(bias).items())))
        self._validate()

    @functools.cached_property  # asked of every row every step
    def greedy(self) -> bool:
        # Below 1e-5 (as in vLLM) dividing by the temperature would overflow: treat as greedy.
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @functools.cached_property
    def shapes_logits(self) -> bool:
        """Something besides temperature, top_k, top_p, min_p and the seed shapes the draw
        (logit bias, allowed ids, min_tokens, penalties) or reads the logits (logprobs): the
        sampler's per-step work for batches without such rows skips it all."""
        return bool(self.logit_bias or self.allowed_token_ids is not None or self.min_tokens > 0
                    or self.logprobs is not None or self.needs_penalties)

    def _validate(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(msg)

        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise bad(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise bad(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad(f"top_k must be -1 (disabled), 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0):
            raise bad(f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise bad(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_STRING_LEN:
                raise bad(f"stop strings must be non-empty strings of at most {MAX_STOP_STRING_LEN} characters")
        if len(self.stop_token_ids) > MAX_STOP_STRINGS:
            raise bad(f"at most {MAX_STOP_STRINGS} stop_token_ids are allowed")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids must be non-negative integers")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise bad(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        if self.stop and not self.detokenize:
            raise bad("stop strings need detokenize=True")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise bad(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}")
        for token, value in self.logit_bias:
            if not isinstance(token, int) or token < 0:
                raise bad(f"logit_bias keys must be token ids (non-negative integers), got {token!r}")
            if not (math.isfinite(value) and -100.0 <= value <= 100.0):
                raise bad(f"logit_bias values must be in [-100, 100], got {value} for token {token}")
        if self.allowed_token_ids is not None:
            if not 0 < len(self.allowed_token_ids) <= MAX_ALLOWED_TOKEN_IDS:
                raise bad(f"allowed_token_ids takes 1 to {MAX_ALLOWED_TOKEN_IDS} token ids, got {len(self.allowed_token_ids)}")
            if any(not isinstance(t, int) or t < 0 for t in self.allowed_token_ids):
                raise bad("allowed_token_ids must be non-negative integers")
        if len(self.bad_words) > MAX_BAD_WORDS:
            raise bad(f"at most {MAX_BAD_WORDS} bad_words are allowed, got {len(self.bad_words)}")
        if any(not isinstance(w, str) or not 0 < len(w) <= MAX_STOP_STRING_LEN for w in self.bad_words):
            raise bad(f"bad_words must be non-empty strings of at most {MAX_STOP_STRING_LEN} characters")
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutputParams):
            raise bad("structured_output must be a StructuredOutputParams")
