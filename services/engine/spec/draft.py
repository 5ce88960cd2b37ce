"""Model drafts: a self-speculative draft (the target's first L layers, its final norm and
LM head) or a second model with the same vocabulary. Both draft greedily, k one-token steps
through the model runner's paged attention over the target's block tables.

KV of the draft:

* self_spec shares the target's cache. Its layers are the target's first L, with the same
  weights, so for every token the target has computed, the target's KV of those layers is
  exactly the draft's: the draft starts at the sequence's last token. The KV it writes for
  its guesses lands in slots the verifying step then overwrites with the target's own.
* draft_model has its own pool, indexed by the target's block ids (same tables, same
  number of blocks: prefix sharing, forks and frees need no bookkeeping of their own). Its
  KV is valid up to a per-sequence count; a sequence new to it (a fresh, preempted,
  migrated or remote-prefilled one) is prefilled by the draft here, in one chunk, the first
  time it speculates. Under disaggregation the decode worker thus computes the draft's
  prompt KV; the target's prompt KV still comes from prefill.
"""

from __future__ import annotations

import torch
from torch import nn

from services.engine.model_runner import ModelRunner
from services.engine.scheduler import ScheduledSeq
from services.engine.sequence import Sequence


class EarlyExit:
    """The target's first `num_layers` layers, then its final norm and LM head."""

    def __init__(self, target: nn.Module, num_layers: int) -> None:
        self.target = target
        self.num_layers = num_layers

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        return self.target(input_ids, positions, attn, self.num_layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target.compute_logits(hidden)


class DraftProposer:
    def __init__(self, runner: ModelRunner, model, kv_cache: torch.Tensor | None) -> None:
        """`kv_cache`: the draft model's own pool (kv_pool), or None to share the target's
        (a self-speculative draft)."""
        self.runner = runner
        self.model = model
        self.kv_cache = kv_cache
        self.kv_caches = runner.kv_caches if kv_cache is None else [(layer[0], layer[1]) for layer in kv_cache]
        self._computed: dict[int, int] = {}  # own pool: seq_id -> leading tokens whose draft KV is valid

    def propose(self, work: list[tuple[ScheduledSeq, Sequence, int]]) -> dict[int, list[int]]:
        """Up to k drafts for each (planned decode, its sequence, k), whose slots are allocated."""
        drafts: dict[int, list[int]] = {entry.seq_id: [] for entry, _, _ in work}
        # Step 0: the last token (after the draft's own catch-up, for a draft model).
        step = []
        for entry, seq, k in work:
            start = self._start(seq)
            step.append(ScheduledSeq(entry.seq_id, seq.token_ids[start:], start, entry.block_table, entry.sample))
            self._record(seq, k)
        self._draft(step, drafts)
        for j in range(1, max(k for _, _, k in work)):
            step = [ScheduledSeq(e.seq_id, [drafts[e.seq_id][-1]], seq.num_tokens - 1 + j, e.block_table, e.sample)
                    for e, seq, k in work if k > j]
            self._draft(step, drafts)
        return drafts

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write of the draft's own pool (the target's is the runner's)."""
        if self.kv_cache is not None and copies:
            src = torch.tensor([s for s, _ in copies], device=self.kv_cache.device)
            dst = torch.tensor([d for _, d in copies], device=self.kv_cache.device)
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def release(self, seq_ids: tuple[int, ...]) -> None:
        for seq_id in seq_ids:
            self._computed.pop(seq_id, None)

    def _start(self, seq: Sequence) -> int:
        """The first position the draft computes: its KV is valid before it. Drafts the target
        rejected are past the target's computed tokens, so the bound drops them."""
        if self.kv_cache is None:
            return seq.num_computed_tokens
        return min(self._computed.get(seq.seq_id, 0), seq.num_computed_tokens)

    def _record(self, seq: Sequence, k: int) -> None:
        if self.kv_cache is not None:  # the last token and k-1 drafts get draft KV now
            self._computed[seq.seq_id] = seq.num_tokens - 1 + k

    @torch.inference_mode()
    def _draft(self, step: list[ScheduledSeq], drafts: dict[int, list[int]]) -> None:
        logits, order = self.runner.forward_last(self.model, self.kv_caches, step)
        for s, token in zip(order, logits.argmax(dim=-1).tolist(), strict=True):
            drafts[s.seq_id].append(token)
