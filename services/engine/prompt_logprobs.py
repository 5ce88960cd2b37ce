"""prompt_logprobs (SamplingParams.prompt_logprobs): the logprobs of a prompt's own tokens, from
the logits of the positions before them, computed while the prompt is prefilled.

    chunk of prompt positions  p   p+1  ...  p+n-1
    predicts prompt token      p+1 p+2  ...  p+n      (only those < len(prompt))

Values are those of the raw model distribution, like the sampled tokens' logprobs: the token's
logprob, its rank (1 + how many tokens are strictly more likely) and the top N. The first
prompt token has none (nothing predicts it). A request that asks reads nothing from the prefix
cache (scheduler.py): a cached position has no logits. A prefill worker computes them for a
remotely prefilled request and sends them in its PrefillResult; decode checks them
(EngineCore.finish_kv) and, if the transfer fails, computes the whole prompt itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.engine import sampling_ops as ops
from services.engine.outputs import Logprob
from services.engine.scheduler import ScheduledSeq


@dataclass
class PromptRows:
    """Which rows of a step's final hidden states score which prompt tokens."""

    seqs: list[tuple[int, int, int, int]] = field(default_factory=list)  # (seq id, first position scored, count, N)
    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # the prompt token each row predicts

    def add(self, s: ScheduledSeq, first_row: int) -> None:
        """`s`'s chunk starts at hidden-state row `first_row`."""
        top, targets = s.prompt_logprobs
        self.seqs.append((s.seq_id, s.start_pos + 1, len(targets), top))
        self.rows.extend(range(first_row, first_row + len(targets)))
        self.targets.extend(targets)

    def compute(self, model, hidden: torch.Tensor) -> PromptLogprobs:
        """Queue the logprobs on the device (read back by PromptLogprobs.result)."""
        index = torch.as_tensor(self.rows, device=hidden.device)
        raw = model.compute_logits(hidden[index]).float()
        tokens = torch.as_tensor(self.targets, device=hidden.device)
        return PromptLogprobs(self, ops.logprobs(raw, tokens, max(top for *_, top in self.seqs)))


class PromptLogprobs:
    """One step's prompt logprobs, on the device until `result()`."""

    def __init__(self, rows: PromptRows, tensors: ops.LogprobTensors) -> None:
        self.rows = rows
        self.tensors = tensors

    def result(self) -> dict[int, tuple[int, list[dict[int, Logprob]]]]:
        """seq id -> (the first prompt position scored, one {token id: Logprob} per position)."""
        t = self.tensors
        chosen, rank = t.chosen.tolist(), t.rank.tolist()
        values = t.top_values.tolist() if t.top_values is not None else None
        ids = t.top_ids.tolist() if t.top_ids is not None else None
        out, i = {}, 0
        for seq_id, first, count, top in self.rows.seqs:
            entries = []
            for j in range(i, i + count):
                entry = {self.rows.targets[j]: Logprob(chosen[j], rank[j])}
                for k in range(top):
                    entry.setdefault(ids[j][k], Logprob(values[j][k], k + 1))
                entries.append(entry)
            out[seq_id] = (first, entries)
            i += count
        return out
