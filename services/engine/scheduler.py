"""Continuous batching: which sequences compute which tokens in the next step.

There is no prefill phase and no decode phase. Every sequence has `num_computed_tokens` and
`num_tokens`; each step gives sequences tokens to catch up under two limits, a token budget
(`max_num_batched_tokens`) and a sequence budget (`max_num_seqs`). A decode catches up by one
token, a prompt by as many as the budget allows (chunked prefill), in the same step.

Order is priority (lower first), then arrival. Running sequences are served first; waiting
ones are admitted, with their prefix-cache hits, while budget and free blocks last. When a
running sequence needs a block and none is free, the last sequence in that order (lowest
priority, newest) is preempted: its blocks are freed and it returns to the waiting queue to
recompute later (its cached prefix usually survives, so recompute is mostly cache hits).

The scheduler is plain Python. It hands the model runner a typed `StepPlan` and reads back
sampled tokens; it never touches tensors. A step's bookkeeping has two halves, so the engine
can plan step N+1 while step N runs (async scheduling):

    advance(plan)          when the step is launched: tokens computed, full blocks cached, a
                           PENDING_TOKEN appended where a token is being sampled
    update(plan, sampled)  when its tokens are read back: placeholders replaced, stop rules
"""

from __future__ import annotations

import bisect
import functools
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.engine.block_manager import BlockManager
from services.engine.outputs import SampledToken
from services.engine.sampling_params import SamplingParams
from services.engine.sequence import PENDING_TOKEN, Request, Sequence, SequenceStatus

if TYPE_CHECKING:
    from services.engine.structured_output import GrammarState


@dataclass(frozen=True)
class SampleSpec:
    """What the sampler needs to draw the next token(s) of one sequence."""

    params: SamplingParams
    seq_indices: tuple[int, ...]  # one index; all n of them when a request forks
    num_prompt_tokens: int
    token_ids: list[int]  # prompt + output so far; a read-only view (penalties' first step, seeds' positions)
    grammar: GrammarState | None = None  # structured output: the sequence's grammar state, read-only here
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences never to complete (SamplingParams.bad_words)
    # The host needs this token before the next step is planned: it forks the request, moves
    # a grammar, or ends a prefill-only request. Such a step is read back at once instead of
    # staying in flight. (Penalties count output tokens on the device, and logprobs travel
    # back with the step's tokens: neither syncs.)
    sync: bool = False
    # Speculative decoding: the draft tokens before this row's position (spec/verify.py). The
    # row samples as if they were already output: seed position, min_tokens and penalties.
    drafted: tuple[int, ...] = ()

    @functools.cached_property
    def unshaped(self) -> bool:
        """One row, drawn from the logits as they come: nothing edits or reads them (logit
        bias, allowed ids, min_tokens, penalties, logprobs, a grammar, bad words). Most rows;
        the sampler asks every step, so it is worked out once."""
        return (len(self.seq_indices) == 1 and not self.params.shapes_logits and self.grammar is None
                and not self.bad_words)

    @property
    def output_pos(self) -> int:
        """How many output tokens the sequence already has (part of the sampling seed)."""
        return len(self.token_ids) + len(self.drafted) - self.num_prompt_tokens


@dataclass(slots=True)  # read-only by convention: one per sequence per step, so cheap to build
class ScheduledSeq:
    seq_id: int
    token_ids: list[int]  # the tokens computed this step
    start_pos: int  # position of token_ids[0] (= num_computed_tokens before the step)
    # The sequence's own block table, not a copy (read-only, valid for this step): the runner
    # mirrors tables incrementally and recognises a reallocated table by its identity.
    block_table: list[int]
    sample: SampleSpec | None  # set when the step brings the sequence up to date
    # prompt_logprobs: (top N, the prompt tokens this step's positions predict, in order), or None.
    prompt_logprobs: tuple[int, list[int]] | None = None
    # Speculative decoding: the last token_ids are proposed drafts, scored at every position
    # and kept only as far as the target agrees (spec/). Never with a PENDING_TOKEN.
    num_draft_tokens: int = 0


@dataclass(frozen=True)
class StepPlan:
    seqs: list[ScheduledSeq]
    block_copies: list[tuple[int, int]]  # copy-on-write (src, dst), done before the forward
    # Sequences finished or preempted since the previous plan: the runner drops their state.
    released_seq_ids: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int | None = None  # a sequence this long samples no more (None: no limit)


def _prompt_targets(seq: Sequence, start: int, num_new: int) -> tuple[int, list[int]] | None:
    """prompt_logprobs: the prompt tokens that positions start .. start+num_new-1 predict."""
    request = seq.request
    top = request.params.prompt_logprobs
    if top is None or request.forked or start + 1 >= request.num_prompt_tokens:
        return None
    return top, request.prompt_token_ids[start + 1 : min(start + num_new + 1, request.num_prompt_tokens)]


def _seated(request: Request) -> None:
    """The request leaves the waiting queue for the first time (its queue time ends)."""
    if request.scheduled_time is None:
        request.scheduled_time = time.monotonic()


def _sort_key(seq: Sequence) -> tuple[int, int, int]:
    return seq.sort_key


def plain_sequence(request: Request, seq_id: int, index: int) -> Sequence:
    return Sequence(seq_id=seq_id, index=index, request=request, token_ids=list(request.prompt_token_ids))


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        new_sequence: Callable[[Request, int, int], Sequence] = plain_sequence,
    ) -> None:
        """`new_sequence(request, seq_id, index)` makes the forked siblings of n > 1 requests
        (the engine's version also gives them a detokenizer and a logprobs list)."""
        self.config = config
        self.block_manager = block_manager
        self._new_sequence = new_sequence
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key at the start of each plan
        self._running_sorted = True  # nothing joined `running` since it was last sorted
        self.awaiting_kv: list[Sequence] = []  # blocks allocated, prompt KV coming from a peer
        self._new_kv_pulls: list[Sequence] = []
        self._live: dict[int, Sequence] = {}  # seq_id -> every unfinished sequence
        self._released: list[int] = []  # seq ids finished or preempted since the last plan
        self.num_preemptions = 0
        # No sequence samples at this length (checked for every running one each step).
        self._max_model_len = config.max_model_len if config.max_model_len is not None else sys.maxsize
        # Tokens of each step, for the iteration_tokens histogram (drained by the worker's
        # metrics task; bounded, so an engine without one keeps no history).
        self.step_tokens: deque[int] = deque(maxlen=4096)

    # ---- queue management ----------------------------------------------------------------

    def add(self, request: Request) -> None:
        for seq in request.seqs:
            self._live[seq.seq_id] = seq
            self._enqueue(seq)

    def abort(self, request: Request) -> None:
        """Finish every sequence of `request` now and free all of its blocks."""
        for seq in request.seqs:
            if not seq.finished:
                self.finish(seq, "abort")

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        queue = {
            SequenceStatus.WAITING: self.waiting,
            SequenceStatus.RUNNING: self.running,
            SequenceStatus.WAITING_FOR_KV: self.awaiting_kv,
        }.get(seq.status)
        if queue is not None:
            queue.remove(seq)
        if seq.status is not SequenceStatus.FINISHED:
            seq.request.num_finished += 1
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq.num_pending:  # a token still in flight is dropped with its step's output
            del seq.token_ids[-seq.num_pending :]
            seq.num_pending = 0
        self._live.pop(seq.seq_id, None)
        self.block_manager.free(seq)
        self._released.append(seq.seq_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.awaiting_kv)

    def take_kv_pulls(self) -> list[Sequence]:
        """Sequences allocated for remote prefill since the last call: their KV may now come."""
        pulls, self._new_kv_pulls = self._new_kv_pulls, []
        return pulls

    def kv_arrived(self, seq: Sequence, first_tokens: list[SampledToken],
                   on_token: Callable[[Sequence, SampledToken], None]) -> None:
        """The prompt's KV is in `seq`'s blocks: continue with the first token(s) prefill sampled."""
        self.awaiting_kv.remove(seq)
        self._run(seq)
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.block_manager.cache_computed_blocks(seq)
        self._append(seq, first_tokens, on_token)

    def kv_failed(self, seq: Sequence, num_valid_tokens: int) -> None:
        """The transfer broke: keep the valid leading tokens and prefill the rest locally."""
        self.awaiting_kv.remove(seq)
        self._run(seq)
        seq.num_computed_tokens = num_valid_tokens
        self.block_manager.cache_computed_blocks(seq)

    def live(self, seq_id: int) -> Sequence | None:
        """The unfinished sequence `seq_id`, if any."""
        return self._live.get(seq_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        entries: list[ScheduledSeq] = []  # built as each sequence is scheduled: preemption only takes later ones
        copies: list[tuple[int, int]] = []
        preempted = False

        if not self._running_sorted:  # only after admissions or forks: re-keying every sequence each step is not free
            self.running.sort(key=_sort_key)
            self._running_sorted = True
        running, allocate = self.running, self.block_manager.allocate_slots
        max_model_len = self._max_model_len
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            if seq.num_pending:
                num_tokens = len(seq.token_ids)
                if num_tokens >= seq.max_num_tokens or num_tokens >= max_model_len:
                    i += 1  # its pending token is its last: the read-back finishes it
                    continue
            num_new = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            seq_copies = allocate(seq, num_new)
            while seq_copies is None:
                victim = running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
                seq_copies = allocate(seq, num_new)
            if seq_copies is None:
                continue  # `seq` preempted itself; running[i] is now the next one
            if seq_copies:
                copies.extend(seq_copies)
            entries.append(self._plan_entry(seq, num_new))
            budget -= num_new
            i += 1

        # Admit waiting sequences, unless this step already had to preempt.
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            width = seq.request.params.n if not seq.request.forked else 1
            seated = len(self.running) + len(self.awaiting_kv)
            if seated + width > self.config.max_num_seqs and seated:
                break
            # prompt_logprobs need every prompt position's logits: a cached block has none.
            hits = self.block_manager.get_cached_prefix(seq) \
                if not seq.block_table and seq.request.params.prompt_logprobs is None else []
            num_hit = len(hits) * self.block_manager.block_size
            if seq.request.kv_import is not None and seq.request.kv_import.state == "pending":
                if not self._admit_for_remote_kv(seq, hits):
                    break
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens - num_hit, budget)
            seq_copies = self.block_manager.allocate_slots(seq, num_new, hits)
            if seq_copies is None:
                break
            copies.extend(seq_copies)
            if seq.num_preemptions == 0:
                seq.num_prefix_hit_tokens = num_hit
            seq.num_computed_tokens += num_hit
            self.waiting.pop(0)
            _seated(seq.request)
            self._run(seq)
            entries.append(self._plan_entry(seq, num_new))
            budget -= num_new

        if entries:
            self.step_tokens.append(self.config.max_num_batched_tokens - budget)
        released, self._released = tuple(self._released), []
        return StepPlan(entries, copies, released)

    def advance(self, plan: StepPlan) -> None:
        """The step is launched: its tokens count as computed, and each single token being
        sampled is appended as a placeholder, so the next plan can decode it."""
        cache_blocks, live = self.block_manager.cache_computed_blocks, self._live
        block_size = self.block_manager.block_size
        for entry in plan.seqs:
            seq = live.get(entry.seq_id)
            if seq is None:  # finished (an abort, or a stop read back from the step before)
                continue
            # Drafts count as computed only once accepted (update): their KV may be rolled back.
            seq.num_computed_tokens += len(entry.token_ids) - entry.num_draft_tokens
            # Before the placeholder: only read-back tokens are hashed. Only a step that fills a
            # block has one to cache (a decode, one step in block_size): the others skip the call.
            if seq.num_computed_tokens // block_size > seq.num_cached_blocks:
                cache_blocks(seq)
            if entry.num_draft_tokens:
                continue  # read back at once (speculating steps are synchronous): no placeholder
            if entry.sample is not None and len(entry.sample.seq_indices) == 1:
                seq.token_ids.append(PENDING_TOKEN)
                seq.num_pending += 1

    def update(
        self,
        plan: StepPlan,
        sampled: dict[int, list[SampledToken]],
        on_token: Callable[[Sequence, SampledToken], None],
    ) -> list[Request]:
        """The step's tokens are read back (after `advance(plan)`, before the next plan's
        advance, so a sequence's placeholder is its last token); returns the requests that changed.

        `sampled` maps seq_id -> the token(s) drawn for it (n tokens when a request forks).
        `on_token(seq, token)` runs after each token is in place; it decides whether the
        sequence stops (the engine owns stop rules, text and logprobs). A sequence that
        finished since the step was planned drops its token.
        """
        changed: dict[int, Request] = {}
        live = self._live
        for entry in plan.seqs:
            tokens = sampled.get(entry.seq_id)
            seq = live.get(entry.seq_id)
            if tokens is None or seq is None:
                continue
            request = seq.request
            changed[id(request)] = request
            if entry.num_draft_tokens:
                self._accept(seq, tokens, on_token)
            else:
                self._append(seq, tokens, on_token)
        return list(changed.values())

    def add_lookahead(self, entry: ScheduledSeq, num_draft_tokens: int) -> bool:
        """Give a planned decode `num_draft_tokens` more cache slots for drafts (speculative
        decoding), or nothing if that needs more blocks than are free: speculation never preempts."""
        seq = self._live[entry.seq_id]
        copies = self.block_manager.allocate_slots(seq, len(entry.token_ids) + num_draft_tokens)
        assert not copies, "the planned decode already made its write block its own"
        return copies is not None

    def _accept(self, seq: Sequence, tokens: list[SampledToken],
                on_token: Callable[[Sequence, SampledToken], None]) -> None:
        """A speculating step's output: the accepted drafts, then the target's own next token.
        Each accepted draft's KV (written by the step) becomes computed when the token after
        it is appended; the rolled-back slots are freed or overwritten by the next steps, and
        only computed, full blocks are ever hashed into the prefix cache."""
        for i, token in enumerate(tokens):
            if i:
                seq.num_computed_tokens += 1
            seq.token_ids.append(token.token_id)
            on_token(seq, token)
            if seq.finished:
                return
        self.block_manager.cache_computed_blocks(seq)
        self.block_manager.trim(seq, seq.num_tokens)

    def _append(self, seq: Sequence, tokens: list[SampledToken],
                on_token: Callable[[Sequence, SampledToken], None]) -> None:
        if len(tokens) == 1:
            if seq.num_pending:  # advance() left a placeholder; this step's is always the last one
                seq.token_ids[-1] = tokens[0].token_id
                seq.num_pending -= 1
            else:
                seq.token_ids.append(tokens[0].token_id)
            on_token(seq, tokens[0])
            return
        for target, token in zip(self._fork(seq, len(tokens)), tokens, strict=True):
            target.token_ids.append(token.token_id)
            on_token(target, token)

    # ---- internals -----------------------------------------------------------------------

    def _plan_entry(self, seq: Sequence, num_new: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        end = start + num_new
        sample = None
        if end == len(seq.token_ids):
            sample = seq.sample_spec if seq.sample_spec is not None else self._sample_spec(seq)
        prompt_logprobs = _prompt_targets(seq, start, num_new) if seq.params.prompt_logprobs is not None else None
        return ScheduledSeq(seq.seq_id, seq.token_ids[start:end], start, seq.block_table, sample, prompt_logprobs)

    @staticmethod
    def _sample_spec(seq: Sequence) -> SampleSpec:
        """What the sampler needs for `seq`'s next token; kept on the sequence, unless it forks."""
        request = seq.request
        params = request.params
        fork = params.n > 1 and not request.forked
        sample = SampleSpec(
            params=params,
            seq_indices=tuple(range(params.n)) if fork else (seq.index,),
            num_prompt_tokens=request.num_prompt_tokens,
            token_ids=seq.token_ids,
            grammar=seq.grammar,
            bad_words=request.bad_words,
            # A bad word of several tokens is banned by the tokens before it: the host must have them.
            sync=fork or seq.grammar is not None or request.kv_export is not None
            or any(len(w) > 1 for w in request.bad_words),
        )
        if not fork:  # the same spec serves every later step (token_ids is a live view)
            seq.sample_spec = sample
        return sample

    def _fork(self, parent: Sequence, n: int) -> list[Sequence]:
        """Create the n-1 siblings of `parent`, sharing its blocks; returns all n in index order."""
        request = parent.request
        request.forked = True
        for index in range(1, n):
            # Sequence ids of a request are consecutive: the engine reserves n ids per request.
            child = self._new_sequence(request, parent.seq_id + index, index)
            child.token_ids = list(parent.token_ids)
            self._live[child.seq_id] = child
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_prefix_hit_tokens = parent.num_prefix_hit_tokens
            self.block_manager.fork(parent, child)
            request.seqs.append(child)
            self._run(child)
        return request.seqs

    def _admit_for_remote_kv(self, seq: Sequence, hits: list[int]) -> bool:
        """Allocate the whole prompt now (no compute, no token budget) and wait for its KV."""
        num_hit = len(hits) * self.block_manager.block_size
        if self.block_manager.allocate_slots(seq, seq.num_tokens - num_hit, hits) is None:
            return False
        seq.num_computed_tokens = seq.num_prefix_hit_tokens = num_hit
        seq.request.kv_import.mark_allocated(len(hits), len(seq.block_table))
        self.waiting.pop(0)
        _seated(seq.request)
        seq.status = SequenceStatus.WAITING_FOR_KV
        self.awaiting_kv.append(seq)
        self._new_kv_pulls.append(seq)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        self._released.append(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=_sort_key)

    def _run(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self._running_sorted = False
