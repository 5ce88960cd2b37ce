"""The speculator: between the scheduler's plan and the model runner, it turns planned
decodes into speculating ones.

    plan = scheduler.schedule()
    plan = speculator.speculate(plan)    # drafts proposed, their slots allocated
    step = runner.execute(plan)          # k+1 positions scored, drafts verified (verify.py)

A planned decode speculates when its sequence has all its tokens on the host (no
PENDING_TOKEN), samples one token (not a fork), exports no KV, did not opt out (SamplingParams.speculative), and has room (no step speculates while
`disable_by_batch_size` sequences run): k never runs past max_tokens or the
context, the step's token budget, or the free blocks (speculation never preempts).

k adapts per sequence, from that sequence's own last verification only (never from the
batch): after j of k drafts were accepted it next proposes j + 1 (one more than the run it
just had) when one was rejected, k + 1 when all were, up to num_speculative_tokens. A
sequence whose guesses fail thus costs one extra scored position a step, not k.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from services.engine.outputs import SampledToken
from services.engine.scheduler import ScheduledSeq, Scheduler, StepPlan
from services.engine.sequence import Sequence
from services.engine.spec import verify
from services.engine.spec.config import SpeculativeConfig
from services.engine.spec.draft import DraftProposer
from services.engine.spec.ngram import NgramProposer


@dataclass
class SpecStats:
    """Counters with vLLM's names (the pdserve:spec_decode_* metrics)."""

    num_drafts: int = 0  # speculating sequence-steps
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [j]: drafts accepted at position j
    drafted_per_pos: list[int] = field(default_factory=list)  # [j]: drafts proposed at position j (k adapts)

    def acceptance_per_pos(self) -> list[float]:
        """Per draft position, the fraction of the drafts proposed there that were accepted."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_pos, self.drafted_per_pos, strict=True)]


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer: NgramProposer | DraftProposer, scheduler: Scheduler,
                 max_num_batched_tokens: int, max_model_len: int) -> None:
        self.config = config
        self.proposer = proposer
        self.scheduler = scheduler
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        k = config.num_speculative_tokens
        self.stats = SpecStats(accepted_per_pos=[0] * k, drafted_per_pos=[0] * k)
        self._k: dict[int, int] = {}  # seq_id -> drafts it proposes next (adaptive k)

    def speculate(self, plan: StepPlan, copy_blocks) -> StepPlan:
        """`plan` with drafts on the decodes that can speculate. `copy_blocks(copies)` runs the
        plan's copy-on-write first when a model drafts (it reads the cache); the returned plan
        then has none left."""
        limit = self.config.disable_by_batch_size
        if limit is not None and self.scheduler.num_running >= limit:
            return plan
        budget = self.max_num_batched_tokens - plan.num_tokens
        work: list[tuple[ScheduledSeq, Sequence, int]] = []
        for entry in plan.seqs:
            seq = self._eligible(entry)
            if seq is None or budget <= 0:
                continue
            k = min(self._k.get(seq.seq_id, self.config.num_speculative_tokens), budget, self._room(seq))
            if k > 0:
                work.append((entry, seq, k))
                budget -= k
        if not work:
            return plan
        if isinstance(self.proposer, NgramProposer):
            drafts = {e.seq_id: self._allowed(seq, self.proposer.propose(seq.token_ids, k)) for e, seq, k in work}
            drafts = {i: d for i, d in drafts.items() if d and self.scheduler.add_lookahead(self._entry(plan, i), len(d))}
        else:
            work = [(e, seq, k) for e, seq, k in work if self.scheduler.add_lookahead(e, k)]
            if not work:
                return plan
            if plan.block_copies:
                copy_blocks(plan.block_copies)
                self.proposer.copy_blocks(plan.block_copies)
                plan = dataclasses.replace(plan, block_copies=[])
            proposed = self.proposer.propose(work)
            drafts = {e.seq_id: self._allowed(seq, proposed[e.seq_id]) for e, seq, _ in work}
            for e, seq, _ in work:
                if not drafts[e.seq_id]:  # the grammar cut them all: give the slots back
                    self.scheduler.block_manager.trim(seq, seq.num_tokens)
        if not drafts:
            return plan
        seqs = [dataclasses.replace(e, token_ids=e.token_ids + drafts[e.seq_id], num_draft_tokens=len(drafts[e.seq_id]))
                if drafts.get(e.seq_id) else e for e in plan.seqs]
        return dataclasses.replace(plan, seqs=seqs)

    def observe(self, plan: StepPlan, sampled: dict[int, list[SampledToken]]) -> None:
        """Count a read-back step's drafts and how many the target accepted."""
        stats = self.stats
        for entry in plan.seqs:
            tokens = sampled.get(entry.seq_id)
            if not entry.num_draft_tokens or tokens is None:
                continue
            num_accepted = len(tokens) - 1
            k = entry.num_draft_tokens
            self._k[entry.seq_id] = min(self.config.num_speculative_tokens, num_accepted + 1 if num_accepted < k else k + 1)
            stats.num_drafts += 1
            stats.num_draft_tokens += entry.num_draft_tokens
            stats.num_accepted_tokens += num_accepted
            for j in range(k):
                stats.drafted_per_pos[j] += 1
                stats.accepted_per_pos[j] += j < num_accepted

    def release(self, seq_ids: tuple[int, ...]) -> None:
        for seq_id in seq_ids:
            self._k.pop(seq_id, None)
        if isinstance(self.proposer, DraftProposer):
            self.proposer.release(seq_ids)

    def _eligible(self, entry: ScheduledSeq) -> Sequence | None:
        spec = entry.sample
        if len(entry.token_ids) != 1 or spec is None or len(spec.seq_indices) != 1:
            return None
        seq = self.scheduler.live(entry.seq_id)
        if seq is None or seq.num_pending or seq.request.kv_export is not None or not seq.params.speculative:
            return None
        return seq

    @staticmethod
    def _allowed(seq: Sequence, drafts: list[int]) -> list[int]:
        """Drafts up to the first one the sequence's grammar forbids (the target would reject it)."""
        return verify.grammar_prefix(seq.grammar, drafts) if seq.grammar is not None and drafts else drafts

    def _room(self, seq: Sequence) -> int:
        """Most drafts whose acceptance cannot run past max_tokens or the context: with j drafts
        accepted the step outputs j + 1 tokens."""
        return min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1

    @staticmethod
    def _entry(plan: StepPlan, seq_id: int) -> ScheduledSeq:
        return next(e for e in plan.seqs if e.seq_id == seq_id)
