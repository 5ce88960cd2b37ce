"""Per-row sampling parameters of a step as device tensors, built once and reused while the
batch does not change (the same rows, in the same order, with the same parameters).

    BatchParams   the static part: temperature, top_k, top_p, min_p, penalties, logit bias,
                  min_tokens' banned ids, seeds, which rows are greedy, want logprobs, have
                  a grammar; keyed by each row's (SamplingParams, seq index)
    OutputCounts  each penalised row's output-token counts and prompt tokens on the device,
                  updated there by every draw: penalties never need the host's token list
                  after a row's first step, so they run under async scheduling

Host-to-device copies go through pinned memory without blocking: a copy from pageable memory
would wait for the work already queued on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.engine.sampling_ops import Filters
from services.engine.scheduler import SampleSpec

Row = tuple[SampleSpec, int]  # (spec, seq index): one logits row


def to_device(values: list | np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.as_tensor(np.asarray(values), dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def batch_key(rows: list[Row]) -> tuple:
    return tuple((id(spec.params), idx) for spec, idx in rows)


@dataclass
class BatchParams:
    key: tuple
    params: list  # the rows' SamplingParams, kept alive so that the ids in `key` stay theirs
    greedy: list[bool]
    draw_rows: list[int]  # rows that draw at random
    draw_index: torch.Tensor | None  # their indices on the device (None: every row draws)
    values: DrawValues  # their temperature and filters on the host
    temperature: torch.Tensor  # [D]
    filters: Filters
    seeds: np.ndarray  # [D] uint64 (0 where unseeded)
    seeded: np.ndarray  # [D] bool
    seq_index: np.ndarray  # [D] int64
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, token ids, values)
    allowed: tuple[torch.Tensor, torch.Tensor] | None  # (rows [A], allowed mask [A, V]) of rows with allowed_token_ids
    banned: list[tuple[int, int]]  # (row, token id): one-token bad words, banned at every step
    bad_word_rows: list[int]  # rows with bad words of several tokens (checked against the output each step)
    min_tokens: list[tuple[int, int, list[int]]]  # (row, min_tokens, banned ids) for rows with min_tokens
    grammar_rows: list[int]
    penalty_rows: list[int]
    penalty_index: torch.Tensor | None
    penalties: tuple[torch.Tensor | None, ...] | None  # repetition, frequency, presence [P] (None: no row's)
    logprob_rows: list[int]
    logprob_index: torch.Tensor | None
    top_logprobs: int  # the most top-N logprobs a row asks for

    @classmethod
    def build(cls, rows: list[Row], eos_token_ids: tuple[int, ...], vocab: int, device: torch.device) -> BatchParams:
        params = [spec.params for spec, _ in rows]
        greedy = [p.greedy for p in params]
        draw_rows = [r for r, g in enumerate(greedy) if not g]
        drawn = [params[r] for r in draw_rows]
        draw_index = None if len(draw_rows) == len(rows) else to_device(draw_rows, torch.long, device)
        if not any(p.shapes_logits for p in params) and not any(s.grammar is not None or s.bad_words for s, _ in rows):
            # The usual batch (temperature, top_k/top_p/min_p, seeds): built every time the
            # batch changes, which is nearly every step under load, so only what it needs.
            return cls(key=batch_key(rows), params=params, greedy=greedy, draw_rows=draw_rows, draw_index=draw_index,
                       **_draw_fields(rows, draw_rows, drawn, vocab, device), bias=None, allowed=None, banned=[],
                       bad_word_rows=[], min_tokens=[], grammar_rows=[], penalty_rows=[], penalty_index=None,
                       penalties=None, logprob_rows=[], logprob_index=None, top_logprobs=0)
        penalty_rows = [r for r, p in enumerate(params) if p.needs_penalties]
        logprob_rows = [r for r, p in enumerate(params) if p.logprobs is not None]
        return cls(
            key=batch_key(rows),
            params=params,
            greedy=greedy,
            draw_rows=draw_rows,
            draw_index=draw_index,
            **_draw_fields(rows, draw_rows, drawn, vocab, device),
            bias=_bias(params, device),
            allowed=_allowed(params, vocab, device),
            banned=[(r, w[0]) for r, (spec, _) in enumerate(rows) for w in spec.bad_words if len(w) == 1 and w[0] < vocab],
            bad_word_rows=[r for r, (spec, _) in enumerate(rows) if any(len(w) > 1 for w in spec.bad_words)],
            min_tokens=[(r, p.min_tokens, _banned(p, eos_token_ids, vocab))
                        for r, p in enumerate(params) if p.min_tokens > 0],
            grammar_rows=[r for r, (spec, _) in enumerate(rows) if spec.grammar is not None],
            penalty_rows=penalty_rows,
            penalty_index=to_device(penalty_rows, torch.long, device) if penalty_rows else None,
            penalties=_penalties([params[r] for r in penalty_rows], device) if penalty_rows else None,
            logprob_rows=logprob_rows,
            logprob_index=to_device(logprob_rows, torch.long, device) if logprob_rows else None,
            top_logprobs=max((params[r].logprobs for r in logprob_rows), default=0),
        )

    @property
    def all_greedy(self) -> bool:
        return not self.draw_rows


@dataclass(frozen=True)
class DrawValues:
    """The temperature and filters of the rows that draw, on the host, as the device tensors
    hold them: what those are made of, and what a decode graph stages (Sampler.in_graph)."""

    temperature: np.ndarray  # float32 [D]
    top_k: np.ndarray  # int64 [D] (0: none, also for a k that keeps the whole vocabulary)
    top_p: np.ndarray  # float32 [D] (1: none)
    min_p: np.ndarray  # float32 [D] (0: none)

    @classmethod
    def of(cls, drawn: list, vocab: int) -> DrawValues:
        return cls(temperature=np.array([p.temperature for p in drawn], dtype=np.float32),
                   top_k=np.array([p.top_k if 0 < p.top_k < vocab else 0 for p in drawn], dtype=np.int64),
                   top_p=np.array([p.top_p for p in drawn], dtype=np.float32),
                   min_p=np.array([p.min_p for p in drawn], dtype=np.float32))


def _draw_fields(rows: list[Row], draw_rows: list[int], drawn: list, vocab: int, device: torch.device) -> dict:
    """What the rows that draw at random need: temperature, filters and the seeds' keys."""
    values = DrawValues.of(drawn, vocab)
    return dict(
        values=values,
        temperature=to_device(values.temperature, torch.float32, device),
        filters=_filters(values, device),
        seeds=np.array([p.seed or 0 for p in drawn], dtype=np.uint64),
        seeded=np.array([p.seed is not None for p in drawn], dtype=bool),
        seq_index=np.array([rows[r][1] for r in draw_rows], dtype=np.int64),
    )


def _filters(v: DrawValues, device: torch.device) -> Filters:
    max_k = int(v.top_k.max(initial=0))
    has_p = v.top_p < 1.0
    return Filters(
        top_k=to_device(v.top_k, torch.long, device) if max_k else None,
        top_p=to_device(v.top_p, torch.float32, device) if has_p.any() else None,
        min_p=to_device(v.min_p, torch.float32, device) if (v.min_p > 0.0).any() else None,
        max_k=max_k,
        top_p_without_k=bool((has_p & (v.top_k == 0)).any()),
    )


def _penalties(params: list, device: torch.device) -> tuple[torch.Tensor | None, ...]:
    kinds = (("repetition_penalty", 1.0), ("frequency_penalty", 0.0), ("presence_penalty", 0.0))
    return tuple(to_device([getattr(p, name) for p in params], torch.float32, device)
                 if any(getattr(p, name) != neutral for p in params) else None for name, neutral in kinds)


def _bias(params: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    entries = [(r, t, b) for r, p in enumerate(params) for t, b in p.logit_bias]
    if not entries:
        return None
    rows, ids, values = zip(*entries, strict=True)
    return (to_device(rows, torch.long, device), to_device(ids, torch.long, device),
            to_device(values, torch.float32, device))


def _allowed(params: list, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    rows = [r for r, p in enumerate(params) if p.allowed_token_ids is not None]
    if not rows:
        return None
    mask = torch.zeros(len(rows), vocab, dtype=torch.bool)
    for i, r in enumerate(rows):
        mask[i, [t for t in params[r].allowed_token_ids if t < vocab]] = True
    return to_device(rows, torch.long, device), mask.pin_memory().to(device, non_blocking=True) \
        if device.type == "cuda" else mask


def _banned(p, eos_token_ids: tuple[int, ...], vocab: int) -> list[int]:
    banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
    return [t for t in banned if t < vocab]


class OutputCounts:
    """Output-token counts [P, V] (float32: exact to 2**24) and prompt membership [P, V] of the penalised rows, on the
    device. A row keeps its state while its (spec, seq index) is in every step; a row new to
    the batch (or back after a step away, such as a preempted sequence) is counted from its
    token list, which is then complete: a sequence absent from the previous step has no token
    in flight."""

    def __init__(self) -> None:
        self._keys: list[tuple[int, int]] = []
        self._specs: list[SampleSpec] = []  # kept alive so that the ids in the keys stay theirs
        self.counts: torch.Tensor | None = None
        self.prompt: torch.Tensor | None = None

    def prepare(self, rows: list[Row], vocab: int, device: torch.device) -> None:
        keys = [(id(spec), idx) for spec, idx in rows]
        if keys == self._keys:
            return
        old = {k: i for i, k in enumerate(self._keys)}
        counts = torch.zeros(len(rows), vocab, dtype=torch.float32, device=device)
        prompt = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
        kept = [(i, old[k]) for i, k in enumerate(keys) if k in old]
        if kept:
            dst, src = (to_device(list(x), torch.long, device) for x in zip(*kept, strict=True))
            counts[dst] = self.counts[src]
            prompt[dst] = self.prompt[src]
        fresh = [i for i, k in enumerate(keys) if k not in old]
        if fresh:
            self._count_from_host(counts, prompt, [rows[i][0] for i in fresh], fresh)
        self._keys, self._specs = keys, [spec for spec, _ in rows]
        self.counts, self.prompt = counts, prompt

    @staticmethod
    def _count_from_host(counts: torch.Tensor, prompt: torch.Tensor, specs: list[SampleSpec], at: list[int]) -> None:
        parts: dict[bool, tuple[list, list]] = {True: ([], []), False: ([], [])}  # is prompt -> (rows, ids)
        for row, spec in zip(at, specs, strict=True):
            ids = np.asarray(spec.token_ids + list(spec.drafted) if spec.drafted else spec.token_ids, dtype=np.int64)
            n = spec.num_prompt_tokens
            for is_prompt, part in ((True, ids[:n]), (False, ids[n:])):
                part = part[(part >= 0) & (part < counts.shape[1])]
                parts[is_prompt][0].append(np.full(len(part), row))
                parts[is_prompt][1].append(part)
        out_rows, out_ids = (to_device(np.concatenate(x), torch.long, counts.device) for x in parts[False])
        counts.index_put_((out_rows, out_ids), torch.ones_like(out_ids, dtype=torch.float32), accumulate=True)
        prompt_rows, prompt_ids = (to_device(np.concatenate(x), torch.long, counts.device) for x in parts[True])
        prompt[prompt_rows, prompt_ids] = True

    def add(self, tokens: torch.Tensor) -> None:
        """Count the tokens just drawn ([P], one per penalised row), on the device."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.float32), accumulate=True)
