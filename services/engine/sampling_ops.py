"""The sampler's tensor operations: every row of a step at once, no per-row Python, no host sync.

Filters become one threshold per row, in the temperature-scaled logit space `x`, plus min_p's
ratio test on the weights w = exp(x - max x) (w of the top token is exactly 1):

    kept(token) = x >= threshold[row]  and  w >= min_p[row]

    min_p       w >= min_p (the top token's probability times min_p, as a ratio of weights)
    top_k       threshold >= the k-th largest x (ties with it kept)
    top_p       threshold >= the smallest x whose strictly larger kept tokens weigh < top_p of
                the mass kept by min_p and top_k (ties share a verdict; the top token stays)

The thresholds come from the top `width` candidates of each row (torch.topk: a partial
selection, not a sort of the vocabulary); a top_p row whose every candidate survives is not
resolved by them, and `resolve` says so (the sampler widens those rows, up to the whole row).

The draw is inverse-CDF sampling over the kept weights in token-id order: the first token
whose running sum of weights exceeds u * (sum of kept weights), u uniform in [0, 1) from a
counter-based generator (`counter_uniforms`). Token-id order makes the token a function of the
row's own logits, parameters and u: drawing from the whole row or from its candidates alone
(when they hold every kept token) gives the same token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

NEG_INF = float("-inf")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
SEEDED_STREAM = np.uint64(0x5EED5EED00000000)  # seeded draws: key (seed, seq index, output position)
ENGINE_STREAM = np.uint64(0x0E0E0E0E00000000)  # unseeded draws: key (engine seed, draw number, 0)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scrambles every input bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def counter_uniforms(stream: np.uint64, seed: np.ndarray, index: np.ndarray, counter: np.ndarray,
                     rounds: int = 1) -> np.ndarray:
    """Uniforms in [0, 1) on a 2**-24 grid (exact in float32), `rounds` per key (seed, index,
    counter): a pure function of the key, so a draw does not depend on what else is drawn.
    Shape [n] for one round, [n, rounds] otherwise."""
    with np.errstate(over="ignore"):
        z = _mix64(np.asarray(seed, dtype=np.uint64) ^ stream)
        z = _mix64(z + _GOLDEN * (np.asarray(index, dtype=np.uint64) + np.uint64(1)))
        z = _mix64(z ^ (np.asarray(counter, dtype=np.uint64) * _GOLDEN))
        if rounds > 1:
            z = np.stack([z] + [_mix64(z + np.uint64(r) * _GOLDEN) for r in range(1, rounds)], axis=-1)
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


@dataclass(frozen=True)
class Filters:
    """Per-row filter parameters of the rows that draw (device tensors; None: no row uses it)."""

    top_k: torch.Tensor | None  # [R] int64, k (rows without top_k: 0)
    top_p: torch.Tensor | None  # [R] float32 (rows without top_p: 1.0)
    min_p: torch.Tensor | None  # [R] float32 (rows without min_p: 0.0)
    max_k: int  # the largest top_k of a row (0: none)
    top_p_without_k: bool  # some row has top_p < 1 and no top_k


@dataclass
class Thresholds:
    threshold: torch.Tensor  # [R] float32 in x's space (-inf: nothing dropped by top_k/top_p)
    values: torch.Tensor | None  # [R, width] the candidates' x, descending
    ids: torch.Tensor | None  # [R, width] their token ids
    resolved: torch.Tensor | None  # [R] bool: the threshold is exact (False only for some top_p rows)
    inside: torch.Tensor | None  # [R] bool: every kept token is among the first `check` candidates


def thresholds(x: torch.Tensor, f: Filters, width: int, check: int | None = None) -> Thresholds:
    """The rows' thresholds from their top `width` candidates (width >= f.max_k). `resolved`
    and `inside` look at the first `check` candidates (default: all), so that they depend on
    the row alone, not on the widest top_k of the batch."""
    rows, vocab = x.shape
    width = min(width, vocab)
    if not f.max_k and f.top_p is None and f.min_p is None:
        return Thresholds(torch.full((rows,), NEG_INF, dtype=x.dtype, device=x.device), None, None, None, None)
    values, ids = torch.topk(x, width, dim=-1)  # sorted, descending
    return from_candidates(values, ids, f, vocab, check,
                           lambda threshold, top, kept_w, held: _mass(x, top, threshold, f.min_p, kept_w, held,
                                                                      width == vocab))


def from_candidates(values: torch.Tensor, ids: torch.Tensor | None, f: Filters, vocab: int, check: int | None,
                    mass: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Thresholds:
    """`thresholds` from each row's top candidates (x's values, descending, and their ids, if
    the caller needs them back);
    `mass(threshold, top, kept weights of the candidates, held)` is the weight min_p and
    top_k keep in each row, top_p's denominator (see `_mass`)."""
    rows, width = values.shape
    check = min(check or width, width)
    threshold = torch.full((rows,), NEG_INF, dtype=values.dtype, device=values.device)
    top = values[:, :1]
    has_k = torch.zeros(rows, dtype=torch.bool, device=values.device)
    if f.top_k is not None:
        has_k = f.top_k > 0
        kth = values.gather(1, (f.top_k.clamp(1, width) - 1)[:, None])[:, 0]
        threshold = torch.where(has_k, kth, threshold)
    w = torch.exp(values - top)
    kept = values >= threshold[:, None]
    if f.min_p is not None:
        kept &= w >= f.min_p[:, None]
    resolved = torch.ones(rows, dtype=torch.bool, device=values.device)
    if f.top_p is not None:
        kept_w = torch.where(kept, w, 0.0)
        total = mass(threshold, top, kept_w, has_k & (values[:, -1] < threshold))
        before = torch.cumsum(kept_w, dim=-1) - kept_w
        above = before.gather(1, _run_starts(values))  # the weight of strictly larger kept tokens
        has_p = f.top_p < 1.0
        kept &= (above / total[:, None] < f.top_p[:, None]) | ~has_p[:, None]
        last = kept.sum(dim=-1).clamp(min=1) - 1
        threshold = torch.where(has_p, torch.maximum(threshold, values.gather(1, last[:, None])[:, 0]), threshold)
        # Every checked candidate survives and tokens beyond them may too: only a top_k row
        # (whose k-th is a candidate) or the whole row is then exact.
        open_end = kept[:, check - 1] & (values[:, check - 1] > NEG_INF)
        resolved = ~has_p | ~open_end | has_k | (check == vocab)
    inside = ~kept[:, check - 1] | (values[:, check - 1] == NEG_INF) | (check == vocab)
    return Thresholds(threshold, values, ids, resolved, inside)


def _mass(x: torch.Tensor, top: torch.Tensor, threshold: torch.Tensor, min_p: torch.Tensor | None,
          kept_w: torch.Tensor, held: torch.Tensor, whole: bool) -> torch.Tensor:
    """[R]: the weight min_p and top_k keep in each row (top_p's denominator): from the
    candidates where they hold every such token (`held`: a top_k row whose k-th value does
    not reach past them), else from the whole row (on the CPU only for the rows that need it)."""
    mass = kept_w.sum(dim=-1)
    if whole:
        return mass
    if x.device.type != "cpu":
        return torch.where(held, mass, kept_weights(x, threshold, min_p, top).sum(dim=-1))
    if not bool(held.all()):
        r = torch.nonzero(~held)[:, 0]
        mass[r] = kept_weights(x[r], threshold[r], None if min_p is None else min_p[r], top[r]).sum(dim=-1)
    return mass


def _run_starts(values: torch.Tensor) -> torch.Tensor:
    """For each position of descending rows, the first position holding the same value."""
    pos = torch.arange(values.shape[1], device=values.device).expand_as(values)
    new = torch.ones_like(values, dtype=torch.bool)
    new[:, 1:] = values[:, 1:] != values[:, :-1]
    return torch.cummax(torch.where(new, pos, 0), dim=-1).values


def kept_weights(x: torch.Tensor, threshold: torch.Tensor | None, min_p: torch.Tensor | None,
                 top: torch.Tensor | None = None) -> torch.Tensor:
    """[R, V]: exp(x - max x) where kept, 0 elsewhere (threshold None: no threshold)."""
    if top is None:
        top = x.max(dim=-1, keepdim=True).values
    w = torch.sub(x, top).exp_()
    if threshold is None and min_p is None:
        return w
    drop = x < threshold[:, None] if threshold is not None else None
    if min_p is not None:
        low = w < min_p[:, None]
        drop = low if drop is None else drop.logical_or_(low)
    return w.masked_fill_(drop, 0.0)


def draw_full(x: torch.Tensor, threshold: torch.Tensor | None, min_p: torch.Tensor | None,
              u: torch.Tensor) -> torch.Tensor:
    """[R] token ids: inverse-CDF draws over each whole row's kept weights, in token-id order."""
    return inverse_cdf(kept_weights(x, threshold, min_p), u)


def draw_candidates(t: Thresholds, min_p: torch.Tensor | None, u: torch.Tensor, check: int) -> torch.Tensor:
    """The draws of rows whose kept tokens are all among their first `check` candidates, from
    those candidates alone (in token-id order, as `draw_full`)."""
    values, ids = t.values[:, :check], t.ids[:, :check]
    w = torch.exp(values - values[:, :1])
    drop = values < t.threshold[:, None]
    if min_p is not None:
        drop |= w < min_p[:, None]
    order = torch.argsort(ids.masked_fill(drop, torch.iinfo(ids.dtype).max), dim=-1)
    w = w.masked_fill(drop, 0.0).gather(1, order)
    return ids.gather(1, order).gather(1, inverse_cdf(w, u)[:, None])[:, 0]


def draw_top_p_by_rejection(w: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p draws without finding the top-p set (FlashInfer's pivot method; loops on the
    host, so for the CPU): draw from the kept weights `w` [R, V]; a token whose strictly
    heavier tokens weigh less than top_p of the total is in the set: accept it. Otherwise no
    token as light as it is in the set: draw again from the heavier ones. Conditioned on
    acceptance each round draws from a superset of the set, so the accepted token follows
    the renormalised top-p distribution exactly. `u` [R, rounds]; returns the tokens and which
    rows accepted within the rounds."""
    rows = w.shape[0]
    total = w.sum(dim=-1)
    tokens = torch.zeros(rows, dtype=torch.long)
    done = torch.zeros(rows, dtype=torch.bool)
    pivot = torch.zeros(rows, dtype=w.dtype)
    open_rows = torch.arange(rows)
    for r in range(u.shape[1]):
        wo = w if len(open_rows) == rows else w[open_rows]
        t = inverse_cdf(wo if r == 0 else wo.masked_fill(wo <= pivot[open_rows, None], 0.0), u[open_rows, r])
        wt = wo.gather(1, t[:, None])
        heavier = torch.where(wo > wt, wo, 0.0).sum(dim=-1)
        accept = heavier / total[open_rows] < top_p[open_rows]
        tokens[open_rows[accept]] = t[accept]
        done[open_rows[accept]] = True
        pivot[open_rows] = wt[:, 0]
        open_rows = open_rows[~accept]
        if not len(open_rows):
            break
    return tokens, done


BLOCK = 256  # the draw sums weights a block at a time, then walks one block


def inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[R]: per row, the first index whose running sum of `w` exceeds u * sum(w): the sum of
    each BLOCK of weights, then a walk through the block the target falls in."""
    rows, vocab = w.shape
    full = vocab // BLOCK
    sums = w.unfold(1, BLOCK, BLOCK).sum(dim=-1) if full else w.new_zeros(rows, 0)
    if vocab % BLOCK:
        sums = torch.cat([sums, w[:, full * BLOCK :].sum(dim=-1, keepdim=True)], dim=1)
    cdf = torch.cumsum(sums, dim=-1)
    target = u[:, None] * cdf[:, -1:]
    block = torch.searchsorted(cdf, target, right=True).clamp_(max=sums.shape[1] - 1)
    carry = cdf.gather(1, block) - sums.gather(1, block)
    index = block * BLOCK + torch.arange(BLOCK, device=w.device)
    inside = index < vocab
    wb = w.gather(1, index.clamp(max=vocab - 1)).masked_fill_(~inside, 0.0)
    pick = torch.searchsorted(carry + torch.cumsum(wb, dim=-1), target, right=True).clamp_(max=BLOCK - 1)
    # Sums in another order may put the target past the block's last weight by an ulp, and a
    # zero weight must never be drawn: then take the block's last positive weight.
    last = torch.where(wb > 0, torch.arange(BLOCK, device=w.device), -1).max(dim=-1, keepdim=True).values
    ok = wb.gather(1, pick) > 0
    return (block * BLOCK + torch.where(ok, pick, last))[:, 0]


def penalize(logits: torch.Tensor, counts: torch.Tensor, prompt: torch.Tensor, rep: torch.Tensor | None,
             freq: torch.Tensor | None, pres: torch.Tensor | None) -> torch.Tensor:
    """Repetition (prompt and output tokens), then frequency and presence (output counts), for
    rows [P, V] at once; `counts` [P, V] float32 output-token counts, `prompt` [P, V] bool. A
    penalty no row uses is None."""
    seen_out = counts > 0
    if rep is not None:
        r = rep[:, None]
        penalized = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen_out.logical_or(prompt), penalized, logits)
    if freq is not None:
        logits = logits - freq[:, None] * counts
    if pres is not None:
        logits = logits - torch.where(seen_out, pres[:, None], 0.0)
    return logits


@dataclass
class LogprobTensors:
    """Logprobs of the raw model distribution for the rows that asked (all on the device)."""

    chosen: torch.Tensor  # [L] the sampled token's logprob
    rank: torch.Tensor  # [L] int64, 1 + how many tokens are strictly more likely
    top_values: torch.Tensor | None  # [L, N] descending
    top_ids: torch.Tensor | None  # [L, N]


def logprobs(raw: torch.Tensor, tokens: torch.Tensor, top_n: int) -> LogprobTensors:
    """`raw` [L, V] float32 logits before any processing, `tokens` [L] the sampled ids."""
    lp = torch.log_softmax(raw, dim=-1)
    chosen = lp.gather(1, tokens[:, None])
    rank = (lp > chosen).sum(dim=-1) + 1
    top = torch.topk(lp, top_n, dim=-1) if top_n else None
    return LogprobTensors(chosen[:, 0], rank, top.values if top else None, top.indices if top else None)
