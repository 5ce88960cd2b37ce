"""Verifying drafts against the target.

A speculating sequence's step computes [last token, d_0 .. d_{k-1}] and samples at all k+1
positions. Row j samples as if d_0 .. d_{j-1} were already output (`SampleSpec.drafted`):
the same seed position, min_tokens mask and penalty counts as a step without speculation
would use there. The target's token at row j is drawn exactly as it would be then, so:

    accept d_j while the target's own draw at row j equals it; at the first row where it
    does not (or at row k), output the target's draw and stop.

The output is token for token what decoding without speculation gives, greedy or sampled
(a seeded request reproduces its tokens; an unseeded one draws from the same distribution),
with logprobs, penalties (counting accepted tokens only), min_tokens and grammars unchanged:
row j's grammar mask is the one after d_0 .. d_{j-1} (`DraftedGrammar`), and drafts are cut
where the grammar forbids one (`grammar_prefix`), which the target would reject anyway. This is
the acceptance rule for deterministic proposers (n-gram, greedy drafts), which is every
proposer here.

`rejection_sample` is Leviathan et al. / Chen et al.'s rule for a draft that samples from
its own distribution q: accept d with probability min(1, p(d)/q(d)), else draw from
norm(max(0, p - q)); the output then follows p. It is tested on its own
(tests/test_spec_decode.py); the engine's drafts are greedy (see README: what is missing).
"""

from __future__ import annotations

import dataclasses

import torch

from services.engine.outputs import SampledToken
from services.engine.scheduler import SampleSpec, ScheduledSeq
from services.engine.structured_output import GrammarState


def row_specs(seqs: list[ScheduledSeq]) -> list[SampleSpec]:
    """The sampler's rows of a step: k+1 per speculating sequence, one per other spec."""
    specs: list[SampleSpec] = []
    for s in seqs:
        k = s.num_draft_tokens
        if not k:
            specs.append(s.sample)
            continue
        drafts, grammar = s.token_ids[-k:], s.sample.grammar
        specs.extend(dataclasses.replace(s.sample, drafted=tuple(drafts[:j]),
                                         grammar=DraftedGrammar(grammar, drafts[:j]) if grammar and j else grammar)
                     for j in range(k + 1))
    return specs


class DraftedGrammar:
    """A sequence's grammar state as it would be after `drafted` tokens (all allowed): the
    mask of a speculating row. The state itself is left where it was."""

    __slots__ = ("state", "drafted")

    def __init__(self, state: GrammarState, drafted: list[int]) -> None:
        self.state = state
        self.drafted = drafted

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        for token in self.drafted:
            if not self.state.accept(token):
                raise AssertionError("drafts are cut to their grammar-allowed prefix before the step")
        self.state.fill_bitmask(bitmask, row)
        self.state.rollback(len(self.drafted))


def grammar_prefix(state: GrammarState, drafts: list[int]) -> list[int]:
    """The leading drafts `state` allows, one after the other (the state is left as it was)."""
    n = 0
    while n < len(drafts) and state.accept(drafts[n]):
        n += 1
    state.rollback(n)
    return drafts[:n]


def accepted(seqs: list[ScheduledSeq], groups: list[list[SampledToken]]) -> dict[int, list[SampledToken]]:
    """seq_id -> output tokens: for a speculating sequence the drafts its target agreed
    with, then the target's token at the first disagreement (or after the last draft)."""
    out: dict[int, list[SampledToken]] = {}
    i = 0
    for s in seqs:
        k = s.num_draft_tokens
        if not k:
            out[s.seq_id] = groups[i]
            i += 1
            continue
        drafts = s.token_ids[-k:]
        tokens = []
        for j in range(k + 1):
            token = groups[i + j][0]
            tokens.append(token)
            if j == k or token.token_id != drafts[j]:
                break
        out[s.seq_id] = tokens
        i += k + 1
    return out


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Leviathan/Chen speculative sampling for R sequences of k drafts at once.

    target_probs [R, k+1, V] (the target's distributions at the k+1 positions), draft_probs
    [R, k, V] (the distributions the drafts were drawn from), draft_tokens [R, k]. Returns
    (tokens [R, k+1], num_accepted [R]): row r's output is tokens[r, :num_accepted[r] + 1],
    the accepted drafts then one token from the residual norm(max(0, p - q)) at the first
    rejection, or from p at position k when every draft is accepted.
    """
    rows, k = draft_tokens.shape
    p_d = target_probs[:, :k].gather(2, draft_tokens[..., None])[..., 0]  # [R, k]
    q_d = draft_probs.gather(2, draft_tokens[..., None])[..., 0]
    u = torch.rand(rows, k, generator=generator, device=draft_tokens.device)
    accept = u * q_d < p_d  # u < p/q, without dividing by a zero q
    num_accepted = torch.where(accept.all(dim=1), k, (~accept).int().argmax(dim=1))
    # The distribution of the token after the accepted drafts: the residual at a rejection,
    # the target itself after k acceptances.
    residual = (target_probs[:, :k] - draft_probs).clamp_(min=0)
    residual = torch.cat([residual, target_probs[:, k:]], dim=1)
    at = torch.arange(rows, device=draft_tokens.device)
    last = residual[at, num_accepted]
    # p == q at a rejected position leaves no residual mass: that rejection has probability 0
    last = torch.where(last.sum(dim=-1, keepdim=True) > 0, last, target_probs[at, num_accepted])
    tokens = torch.cat([draft_tokens, draft_tokens.new_zeros(rows, 1)], dim=1)
    tokens[at, num_accepted] = torch.multinomial(last, 1, generator=generator)[:, 0]
    return tokens, num_accepted
