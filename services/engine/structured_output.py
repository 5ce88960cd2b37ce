"""Structured output: grammars that constrain which tokens a sequence may sample (xgrammar).

    StructuredOutputParams --GrammarCompiler.compile (cached by spec, per tokenizer)--> compiled grammar
    each constrained sequence: a GrammarState, advanced by every output token it appends
    each step: apply_grammars fills one token bitmask row per constrained logits row and sets
               the logits of every token the grammar forbids to -inf (before the random draw)

The state follows output tokens, not KV: a preempted sequence keeps its state while its KV is
recomputed; the n sequences of a request each get their own state when they fork (the fork
happens at the first sampled token, when every state is still the initial one); a decode
worker advances its own state by the first token its prefill peer sampled under the same
grammar. A state that has accepted a stop token after a complete match is `terminated`,
and the engine ends the sequence with finish_reason "stop".

JSON schemas compile with no free whitespace (`{"a": 1, "b": [2, 3]}`): a model free to emit
any whitespace can spend its whole token budget on it, and small models do. Object keys
outside a schema's `properties` are not generated (xgrammar's strict mode, as in vLLM).

xgrammar (which imports torch) is imported on first use only: the router checks specs with
`check` and stays torch-free at import, and a worker without xgrammar still serves every
unconstrained request.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from services.engine.errors import InvalidRequestError
from services.engine.sampling_params import StructuredOutputParams

if TYPE_CHECKING:
    import torch

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " and sometimes a failed check.
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:
        raise InvalidRequestError("structured output needs the xgrammar package, which is not installed here") from e
    return xgrammar


def preload() -> None:
    """Import xgrammar now (it takes a second or more), so the first constrained request does not wait."""
    try:
        _xgrammar()
    except InvalidRequestError:
        pass


def _grammar(spec: StructuredOutputParams) -> Any:
    """The spec as an xgrammar Grammar; raises InvalidRequestError for an invalid schema, regex or grammar."""
    xgr = _xgrammar()
    kind, text = spec.key
    try:
        if kind == "json_schema":
            return xgr.Grammar.from_json_schema(text, any_whitespace=False)
        if kind == "json_object":  # any object: strict mode would allow only {}
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(text)
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(text)
        # JSON string literals are valid EBNF string literals (same escapes).
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice))
    except (RuntimeError, ValueError) as e:
        message = _LOCATION.sub("", str(e).strip()).strip()
        raise InvalidRequestError(f"invalid {kind.replace('_', ' ')}: {message}") from e


def check(spec: StructuredOutputParams) -> None:
    """Raise InvalidRequestError unless the spec parses as a grammar (no tokenizer needed)."""
    _grammar(spec)


class GrammarState:
    """One sequence's position in its grammar (an xgrammar GrammarMatcher)."""

    __slots__ = ("_matcher",)

    def __init__(self, compiled: Any) -> None:
        self._matcher = _xgrammar().GrammarMatcher(compiled)

    def accept(self, token_id: int) -> bool:
        """Advance by one output token; False (state unchanged) if the grammar forbids it."""
        return self._matcher.accept_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (speculative drafts checked ahead)."""
        if num_tokens:
            self._matcher.rollback(num_tokens)

    @property
    def terminated(self) -> bool:
        """A complete match followed by a stop token: the sequence is done."""
        return self._matcher.is_terminated()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (1 bit per token, int32 words)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)


class GrammarCompiler:
    """Compiles specs for one tokenizer; compiled grammars are cached (LRU) by spec.

    One compiler per engine, hence per tokenizer: the cache key is (spec, tokenizer). Thread
    safe: workers compile off the event loop while the engine thread creates states.
    """

    def __init__(self, tokenizer_info: Callable[[], Any], max_cached: int = 128) -> None:
        """`tokenizer_info()` builds the xgrammar TokenizerInfo (about a second for a 50k
        vocabulary), called once, on the first compile."""
        self._make_info = tokenizer_info
        self._compiler: Any = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._max_cached = max_cached
        self._lock = threading.Lock()
        self.num_compiled = 0  # cache misses, for tests and metrics

    @classmethod
    def for_tokenizer(cls, hf_tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> GrammarCompiler:
        """For a transformers tokenizer; `vocab_size` is the model's (its logits' width), and
        `stop_token_ids` end a complete match (the engine's EOS ids)."""

        def info() -> Any:
            stops = list(stop_token_ids) or None
            return _xgrammar().TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size, stop_token_ids=stops)

        return cls(info)

    @classmethod
    def for_vocab(cls, vocab: list[str], stop_token_ids: tuple[int, ...]) -> GrammarCompiler:
        """For a vocabulary of plain strings, token id = index (tests build tiny ones)."""
        return cls(lambda: _xgrammar().TokenizerInfo(vocab, stop_token_ids=list(stop_token_ids)))

    def compile(self, spec: StructuredOutputParams) -> Any:
        """The compiled grammar of `spec`; raises InvalidRequestError for an invalid spec."""
        key = spec.key
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = _grammar(spec)
        compiled = self._xgr_compiler().compile_grammar(grammar)
        with self._lock:
            self.num_compiled += 1
            self._cache[key] = compiled
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return compiled

    def new_state(self, compiled: Any) -> GrammarState:
        return GrammarState(compiled)

    def _xgr_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                # This class caches; xgrammar's own cache would hold every grammar a second time.
                self._compiler = _xgrammar().GrammarCompiler(self._make_info(), max_threads=1, cache_enabled=False)
            return self._compiler


def apply_grammars(logits: torch.Tensor, rows: list[tuple[int, GrammarState]]) -> None:
    """Set to -inf, in place, the logits of tokens each row's grammar forbids next.

    `rows` pairs a logits row with its sequence's state; rows that share a state (the n rows
    of a request forking at its first token) share one bitmask fill.
    """
    xgr = _xgrammar()
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[-1])
    filled: dict[int, int] = {}
    for row, state in rows:
        first = filled.setdefault(id(state), row)
        if first == row:
            state.fill_bitmask(bitmask, row)
        else:
            bitmask[row] = bitmask[first]
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=[row for row, _ in rows])
