"""From logits to tokens, for a batch of sequences with per-sequence sampling parameters.

Processing order for each row (the same as vLLM's):

    logit_bias -> grammar mask -> min_tokens mask -> repetition / frequency / presence penalties
               -> greedy argmax or temperature -> min_p -> top_k -> top_p -> random draw

* logit_bias: logit += bias for the listed token ids
* grammar mask (structured output, structured_output.py): tokens the sequence's grammar
  forbids next get -inf
* min_tokens mask: EOS and stop_token_ids get -inf until min_tokens are out, unless that would
  leave no token at all (a complete grammar that allows only EOS): then the grammar wins

* repetition_penalty r (prompt and output tokens): logit > 0 -> logit / r, else logit * r
* frequency_penalty f, presence_penalty p (output tokens, count c): logit -= f * c + p * (c > 0)
* min_p m: drop tokens whose probability is below m * (the top token's probability)
* top_k k: keep the k highest logits (ties with the k-th kept too)
* top_p p: keep the smallest set of most likely tokens whose probability mass reaches p

The random draw is an exponential race, argmax(probs / E) with E ~ Exp(1) per token, which
picks token i with probability probs[i]. For a seeded request E comes from a generator seeded
by (seed, sequence index, output position) alone, so the draw does not depend on batch
composition, chunking, preemption or which process samples.

Logprobs are those of the raw model distribution (before logit_bias, the grammar mask,
penalties and temperature): what the model thinks of each token, whatever the constraints; a
sampled token's logprob is never -inf, though the mask may have ruled out the model's favourite.

`sample` leaves the tokens on the device and starts their copy to the host (`SampledBatch`):
the engine may plan and launch the next step, which reads them on the device, before it
waits for them.
"""

from __future__ import annotations

import torch
import xxhash

from services.engine.outputs import Logprob, SampledToken
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import SampleSpec
from services.engine.structured_output import apply_grammars


def draw_seed(seed: int, seq_index: int, output_pos: int) -> int:
    """The generator seed of one seeded draw: a pure function of its three inputs."""
    h = xxhash.xxh64(seed=0x73616D70)
    h.update(seed.to_bytes(8, "little") + seq_index.to_bytes(4, "little") + output_pos.to_bytes(4, "little"))
    return h.intdigest() & (2**63 - 1)


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], seed: int = 0) -> None:
        self.eos_token_ids = eos_token_ids
        self._generator: torch.Generator | None = None
        self._seed = seed
        self._spare: list[torch.Tensor] = []  # pinned buffers for tokens read back (SampledBatch)

    def __call__(self, logits: torch.Tensor, specs: list[SampleSpec]) -> list[list[SampledToken]]:
        """`logits` has one row per spec; returns, per spec, one token per entry of seq_indices."""
        return self.sample(logits, specs).result()

    def sample(self, logits: torch.Tensor, specs: list[SampleSpec], argmax: torch.Tensor | None = None) -> SampledBatch:
        """Like calling the sampler, without waiting for the tokens. `argmax`: the logits'
        argmax, already computed on the device (a CUDA graph's), for when every row is plain
        greedy."""
        rows = [r for r, spec in enumerate(specs) for _ in spec.seq_indices]
        if len(rows) != len(specs):
            logits = logits[torch.tensor(rows, device=logits.device)]
        expanded = [(spec, idx) for spec in specs for idx in spec.seq_indices]
        # Masks and penalties edit rows in place: never in the caller's tensor.
        edits = any(_edits_logits(s) for s, _ in expanded)
        want_logprobs = any(spec.params.logprobs is not None for spec, _ in expanded)
        raw_logprobs = None
        if not edits and not want_logprobs and all(spec.params.greedy for spec, _ in expanded):
            # Plain greedy: the argmax of bf16 logits is that of their exact float32 upcast,
            # so skip the upcast (a [batch, vocab] copy) and the per-row passes.
            token_ids = argmax if argmax is not None and len(rows) == len(specs) else logits.argmax(dim=-1)
        else:
            logits = logits.to(torch.float32, copy=edits and len(rows) == len(specs))
            raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
            logits = self._apply_logit_bias(logits, expanded)
            constrained = [(r, spec.grammar) for r, (spec, _) in enumerate(expanded) if spec.grammar is not None]
            if constrained:
                apply_grammars(logits, constrained)
            logits = self._apply_min_tokens(logits, expanded)
            logits = self._apply_penalties(logits, expanded)
            token_ids = self._draw(logits, expanded)
        return SampledBatch(token_ids, specs, raw_logprobs, self._spare)

    # ---- processing ----------------------------------------------------------------------

    def _apply_logit_bias(self, logits: torch.Tensor, rows: list[tuple[SampleSpec, int]]) -> torch.Tensor:
        for r, (spec, _) in enumerate(rows):
            bias = spec.params.logit_bias
            if bias:
                ids = torch.tensor([t for t, _ in bias], device=logits.device)
                logits[r, ids] += torch.tensor([b for _, b in bias], device=logits.device)
        return logits

    def _apply_min_tokens(self, logits: torch.Tensor, rows: list[tuple[SampleSpec, int]]) -> torch.Tensor:
        for r, (spec, _) in enumerate(rows):
            p = spec.params
            if spec.output_pos < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
                banned = [t for t in banned if t < logits.shape[-1]]
                if not banned:
                    continue
                row = logits[r].index_fill(0, torch.tensor(banned, device=logits.device), float("-inf"))
                if spec.grammar is None or bool(torch.isfinite(row).any()):
                    logits[r] = row
        return logits

    def _apply_penalties(self, logits: torch.Tensor, rows: list[tuple[SampleSpec, int]]) -> torch.Tensor:
        vocab = logits.shape[-1]
        for r, (spec, _) in enumerate(rows):
            p = spec.params
            if not p.needs_penalties:
                continue
            output = torch.tensor(spec.token_ids[spec.num_prompt_tokens :], dtype=torch.long)
            counts = torch.bincount(output, minlength=vocab)[:vocab].to(logits.device)
            row = logits[r]
            if p.repetition_penalty != 1.0:
                seen = counts > 0
                prompt = torch.tensor(spec.token_ids[: spec.num_prompt_tokens], dtype=torch.long)
                seen[prompt.to(logits.device)] = True
                penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                row = torch.where(seen, penalized, row)
            row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
            logits[r] = row
        return logits

    def _draw(self, logits: torch.Tensor, rows: list[tuple[SampleSpec, int]]) -> torch.Tensor:
        greedy = [spec.params.greedy for spec, _ in rows]
        tokens = logits.argmax(dim=-1)
        if all(greedy):
            return tokens
        for r, (spec, idx) in enumerate(rows):
            if greedy[r]:
                continue
            probs = _filtered_probs(logits[r], spec.params)
            noise = torch.empty_like(probs).exponential_(generator=self._generator_for(spec, idx, probs.device))
            noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # an exact 0 would turn into inf or NaN
            tokens[r] = (probs / noise).argmax()
        return tokens

    def _generator_for(self, spec: SampleSpec, seq_index: int, device: torch.device) -> torch.Generator:
        if spec.params.seed is not None:
            g = torch.Generator(device=device)
            g.manual_seed(draw_seed(spec.params.seed, seq_index, spec.output_pos))
            return g
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._seed)
        return self._generator


class SampledBatch:
    """One step's sampled tokens: on the device at once, on the host after `result()`."""

    def __init__(self, token_ids: torch.Tensor, specs: list[SampleSpec], raw_logprobs: torch.Tensor | None,
                 spare: list[torch.Tensor]) -> None:
        self.token_ids = token_ids  # [rows] int64, one row per (spec, seq index) in order
        self.specs = specs
        self._raw_logprobs = raw_logprobs
        self._ready: torch.cuda.Event | None = None
        self._spare = spare
        self._buffer: torch.Tensor | None = None
        self._flat: list[int] | None = None
        if token_ids.is_cuda:
            # Into pinned memory behind the step's kernels; result() waits for this copy alone,
            # not for a later step queued after it. The buffer is the sampler's, back in its
            # spares once read: allocating pinned memory costs the host ~20 us a step.
            n = token_ids.shape[0]
            fit = next((i for i, b in enumerate(spare) if b.shape[0] >= n), None)
            self._buffer = (spare.pop(fit) if fit is not None
                            else torch.empty(max(n, 256), dtype=torch.long, pin_memory=True))
            self._host = self._buffer[:n]
            self._host.copy_(token_ids, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:  # a copy: the tokens may be a view of a buffer the next step overwrites (cuda_graphs.py)
            self._host = token_ids.clone()

    def result(self) -> list[list[SampledToken]]:
        """Per spec, one token per entry of its seq_indices (waits for the copy)."""
        if self._flat is None:
            if self._ready is not None:
                self._ready.synchronize()
            self._flat = self._host.tolist()
            if self._buffer is not None:
                self._spare.append(self._buffer)
                self._buffer = None
        flat = self._flat
        out: list[list[SampledToken]] = []
        k = 0
        for spec in self.specs:
            group = []
            for _ in spec.seq_indices:
                lps = None
                if spec.params.logprobs is not None:
                    lps = _logprobs_of(self._raw_logprobs[k], flat[k], spec.params.logprobs)
                group.append(SampledToken(flat[k], lps))
                k += 1
            out.append(group)
        return out


def _edits_logits(spec: SampleSpec) -> bool:
    p = spec.params
    return p.needs_penalties or spec.output_pos < p.min_tokens or bool(p.logit_bias) or spec.grammar is not None


def _filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, min_p, top_k and top_p (one row)."""
    logits = logits / p.temperature
    if p.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= p.top_p  # the top token always has mass_before 0
        drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _logprobs_of(logprobs: torch.Tensor, token_id: int, top_n: int) -> dict[int, Logprob]:
    chosen = logprobs[token_id]
    rank = int((logprobs > chosen).sum()) + 1
    result = {token_id: Logprob(float(chosen), rank)}
    if top_n:
        values, ids = torch.topk(logprobs, top_n)
        for i, (v, t) in enumerate(zip(values.tolist(), ids.tolist(), strict=True)):
            result.setdefault(t, Logprob(v, i + 1))
    return result
