"""Requests and their sequences: the state the scheduler owns.

A request carries one prompt and `n` sequences. Until its prompt is computed it has a single
sequence; when the first tokens are sampled, the other n-1 fork from it and share its blocks.

A sequence's progress is one number, `num_computed_tokens`: how many of its `token_ids` have
KV in the cache. Prefill, chunked prefill, prefix-cache hits, recompute after preemption and
decode are all "catch up to len(token_ids)"; when it is caught up, the next token is sampled.

With async scheduling the next step is planned before the current one's token is read back:
the token is appended as `PENDING_TOKEN` (the model runner feeds it to the next step from the
device) and replaced by its value one step later. `num_pending` counts these placeholders;
outputs never show them.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from services.engine.kv_transfer import KVExport, KVImport
from services.engine.outputs import Logprob
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from services.engine.scheduler import SampleSpec
    from services.engine.structured_output import GrammarState

PENDING_TOKEN = -1  # sampled on the device, not read back yet (async scheduling)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # blocks allocated, prompt KV arriving from a prefill worker
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class Resumed:
    """A sequence another worker began (migration): its output so far, and how much of its
    text the client already has. The engine treats `token_ids` as output, not prompt."""

    index: int
    token_ids: list[int]
    text_chars: int = 0


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_order: int = 0  # FCFS tie-break within a priority, assigned by the engine
    arrival_time: float = 0.0
    scheduled_time: float | None = None  # first left the waiting queue (time.monotonic)
    first_token_time: float | None = None  # first output token handed out
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False
    # KV transfer (services/engine/kv_transfer.py): a prefill-only request ships its prompt's
    # blocks; a remote-prefilled request receives them.
    kv_export: KVExport | None = None
    kv_import: KVImport | None = None
    # Structured output: the compiled grammar (an xgrammar object) each sequence's state starts from.
    grammar: Any = None
    # prompt_logprobs: one entry per prompt position (None until computed; the first stays None),
    # handed out once (prompt_logprobs_sent).
    prompt_logprobs: list[dict[int, Any] | None] | None = None
    prompt_logprobs_sent: bool = False
    # bad_words as token sequences (SamplingParams.bad_words, tokenized by the engine).
    bad_words: tuple[tuple[int, ...], ...] = ()
    # Migration: the sequences that continue here (the others finished elsewhere); None: all n.
    resume: list[Resumed] | None = None
    # Sequences finished so far, counted by Scheduler.finish (the one place a sequence
    # finishes): `finished` is asked of every request with a new token, several times a step.
    num_finished: int = 0

    @property
    def num_seqs(self) -> int:
        """How many sequences this request runs here once forked."""
        return len(self.resume) if self.resume is not None else self.params.n

    @functools.cached_property
    def num_prompt_tokens(self) -> int:
        # Cached: read for every sequence every step, and a prompt never changes.
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        if self.num_finished < len(self.seqs):
            return False
        # Before the fork only an abort can finish the lone sequence of an n > 1 request.
        return len(self.seqs) == self.num_seqs or self.seqs[0].finish_reason == "abort"

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache when the request was first admitted."""
        return self.seqs[0].num_prefix_hit_tokens if self.seqs else 0


@dataclass(eq=False)
class Sequence:
    seq_id: int
    index: int  # 0..n-1 within its request; part of the sampling seed
    request: Request
    token_ids: list[int]
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_pending: int = 0  # trailing PENDING_TOKENs in token_ids (0 or 1)
    # KV blocks (owned by the BlockManager, which mutates these three).
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chain over full blocks of token_ids
    num_cached_blocks: int = 0  # leading blocks already registered in the prefix cache
    num_prefix_hit_tokens: int = 0
    num_preemptions: int = 0
    # Output.
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, Logprob]] | None = None
    detokenizer: IncrementalDetokenizer | None = None
    text: str = ""
    # Structured output: where the output so far stands in the request's grammar.
    grammar: GrammarState | None = None
    # How much of the output has been handed out as deltas (streaming).
    num_emitted_tokens: int = 0
    num_emitted_chars: int = 0
    reported_finish: bool = False
    # What the sampler needs for this sequence; built once by the scheduler, then reused.
    sample_spec: SampleSpec | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    # Cached (a sequence never changes request, nor a request its prompt or parameters): the
    # scheduler and the stop rules read these for every sequence every step.
    @functools.cached_property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def num_output_tokens(self) -> int:
        """Output tokens, a pending one included."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """The output tokens read back so far (no placeholder)."""
        return self.output_token_ids_from(0)

    @property
    def num_read_back_tokens(self) -> int:
        """len(output_token_ids), without the copy."""
        return len(self.token_ids) - self.num_pending - self.num_prompt_tokens

    def output_token_ids_from(self, start: int) -> list[int]:
        """output_token_ids[start:], copying only those (outputs go out a few tokens a step)."""
        return self.token_ids[self.num_prompt_tokens + start : len(self.token_ids) - self.num_pending]

    @functools.cached_property
    def params(self) -> SamplingParams:
        return self.request.params

    @functools.cached_property
    def max_num_tokens(self) -> int:
        """Prompt and max_tokens: at this length the sequence samples no more."""
        return self.request.num_prompt_tokens + self.request.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def hash_salt(self) -> tuple[str, ...]:
        salt = self.request.params.cache_salt
        return (salt,) if salt else ()

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Scheduling order: lower priority value first, then first come first served."""
        return (self.request.priority, self.request.arrival_order, self.index)
