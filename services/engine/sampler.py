"""From logits to tokens, for a batch of sequences with per-sequence sampling parameters.

Processing order for each row (the same as vLLM's):

    logit_bias -> allowed_token_ids -> bad_words -> grammar mask -> min_tokens mask -> repetition / frequency / presence penalties
               -> greedy argmax or temperature -> min_p -> top_k -> top_p -> random draw

* logit_bias: logit += bias for the listed token ids
* allowed_token_ids: every other token gets -inf
* bad_words: a one-token word's token gets -inf; a longer word's last token gets -inf where
  the output so far ends with the word's other tokens (the host's tokens: such rows sync)
* grammar mask (structured output, structured_output.py): tokens the sequence's grammar
  forbids next get -inf
* min_tokens mask: EOS and stop_token_ids get -inf until min_tokens are out, unless that would
  leave no token at all (a complete grammar that allows only EOS): then the grammar wins

* repetition_penalty r (prompt and output tokens): logit > 0 -> logit / r, else logit * r
* frequency_penalty f, presence_penalty p (output tokens, count c): logit -= f * c + p * (c > 0)
* min_p m: drop tokens whose probability is below m * (the top token's probability)
* top_k k: keep the k highest logits (ties with the k-th kept too)
* top_p p: keep the most likely tokens while the probability of the tokens strictly more likely
  than them is below p (the top token always; tied tokens share a verdict)

Every step is one pass over all rows (sampling_ops.py), with the rows' parameters as device
tensors built once per batch (sampling_batch.py). The random draw is inverse-CDF sampling with
one uniform per row from a counter-based generator: for a seeded request the key is (seed,
sequence index, output position) alone, so its tokens do not depend on batch composition,
chunking, async scheduling, preemption or which process samples; unseeded rows take the
engine's stream (engine seed, draw number).

Logprobs are those of the raw model distribution (before logit_bias, the grammar mask,
penalties and temperature): what the model thinks of each token, whatever the constraints; a
sampled token's logprob is never -inf, though the mask may have ruled out the model's favourite.
They are computed on the device for all rows at once and read back with the tokens.

`sample` leaves the tokens on the device and starts their copy to the host (`SampledBatch`):
the engine may plan and launch the next step, which reads them on the device, before it
waits for them. Nothing here waits for the device, except (on the CPU only, where waiting is
free) the check that a top_p row's candidates hold its threshold.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from kernels.sample import draw as draw_kernel
from kernels.sample import kept_mass, top_values
from services.engine import sampling_ops as ops
from services.engine.outputs import Logprob, SampledToken
from services.engine.sampling_batch import BatchParams, OutputCounts, Row, batch_key, to_device
from services.engine.scheduler import SampleSpec
from services.engine.structured_output import apply_grammars

CANDIDATES = 256  # CPU: candidates per row (more where a top_k asks); the GPU: candidates_width
REJECTION_ROUNDS = 16  # CPU: top_p draws by rejection before the exact threshold by a full sort
# The most top_k a decode graph draws with: its candidates' width, fixed at capture. The eager
# GPU path takes as many candidates for any batch whose top_k fit, so that both compute the
# same thresholds (kernels/sample.top_values rounds k up to a power of two: 64 costs what 33 does).
GRAPH_TOP_K = 64


@dataclass(frozen=True)
class GraphDraw:
    """One decode step's draw by the graph itself (Sampler.in_graph), a value per row: what
    cuda_graphs.DecodeGraphs.stage uploads with the step's inputs."""

    temperature: np.ndarray  # float32 [n], 0: greedy (the argmax)
    uniforms: np.ndarray  # float32 [n]
    # None where no row filters (the temperature-only graph); else int64 [n] top_k (0: none,
    # at most GRAPH_TOP_K), float32 [n] top_p (1: none) and min_p (0: none)
    top_k: np.ndarray | None = None
    top_p: np.ndarray | None = None
    min_p: np.ndarray | None = None

    @property
    def filtered(self) -> bool:
        return self.top_k is not None


@dataclass(frozen=True)
class _GraphBatch:
    """What Sampler.in_graph stages for one list of specs, but the uniforms: built when the
    list changes, not every step (the scheduler hands the same spec objects to every step of
    a sequence, so a batch of steady decodes keeps its list)."""

    specs: list[SampleSpec]  # kept alive, so that `spec_ids` stay theirs
    spec_ids: list[int]
    batch: BatchParams | None  # None: the graph does not draw this batch (greedy or eager)
    draw: GraphDraw | None = None  # every value but the uniforms (zeros here)
    tokens: list[list[int]] = ()  # the draw rows' live token lists ...
    position_offsets: np.ndarray | None = None  # ... less these: each draw row's output position


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], seed: int = 0) -> None:
        self.eos_token_ids = eos_token_ids
        self._seed = np.uint64(seed)
        self._draws = 0  # unseeded draws so far: the counter of the engine's stream
        self._batch: BatchParams | None = None
        self._graph: _GraphBatch | None = None  # in_graph's last batch
        self._counts = OutputCounts()
        self._spare: list[torch.Tensor] = []  # pinned buffers for tokens read back (SampledBatch)

    def __call__(self, logits: torch.Tensor, specs: list[SampleSpec]) -> list[list[SampledToken]]:
        """`logits` has one row per spec; returns, per spec, one token per entry of seq_indices."""
        return self.sample(logits, specs).result()

    def sample(self, logits: torch.Tensor, specs: list[SampleSpec], argmax: torch.Tensor | None = None) -> SampledBatch:
        """Like calling the sampler, without waiting for the tokens. `argmax`: the logits'
        argmax, already computed on the device (a CUDA graph's), for when every row is plain
        greedy."""
        if all(spec.unshaped and spec.params.greedy for spec in specs):
            # Plain greedy (the argmax of bf16 logits is that of their exact float32 upcast):
            # decided before building the rows and the batch's key, which it does not need.
            return SampledBatch(argmax if argmax is not None else logits.argmax(dim=-1), specs, None, self._spare)
        rows: list[Row] = [(spec, idx) for spec in specs for idx in spec.seq_indices]
        if len(rows) != len(specs):
            expand = [r for r, spec in enumerate(specs) for _ in spec.seq_indices]
            logits = logits[to_device(expand, torch.long, logits.device)]
            argmax = None
        batch = self._params(rows, logits)
        active_min = [(r, banned) for r, n, banned in batch.min_tokens if rows[r][0].output_pos < n]
        banned = batch.banned + _completing_bad_words(rows, batch.bad_word_rows)
        edits = bool(batch.bias is not None or batch.allowed is not None or banned or batch.grammar_rows
                     or active_min or batch.penalty_rows)
        if not edits and not batch.logprob_rows and batch.all_greedy:
            # Plain greedy: the argmax of bf16 logits is that of their exact float32 upcast,
            # so skip the upcast (a [batch, vocab] copy).
            return SampledBatch(argmax if argmax is not None else logits.argmax(dim=-1), specs, None, self._spare)
        raw = logits[batch.logprob_index].float() if batch.logprob_rows else None
        # Edits write in place: never into the caller's tensor (a CUDA graph's output). On a
        # GPU the draw kernel reads the logits in their own dtype: no upcast without edits.
        if edits or not logits.is_cuda:
            logits = logits.to(torch.float32, copy=edits)
        logits = self._process(logits, rows, batch, active_min, banned)
        tokens = self._draw(logits, rows, batch)
        if batch.penalty_rows:
            self._counts.add(tokens[batch.penalty_index] if len(batch.penalty_rows) != len(rows) else tokens)
        lps = None
        if raw is not None:
            lps = ops.logprobs(raw, tokens[batch.logprob_index], batch.top_logprobs)
        return SampledBatch(tokens, specs, lps, self._spare,
                            [(r, rows[r][0].params.logprobs) for r in batch.logprob_rows])

    def in_graph(self, specs: list[SampleSpec], vocab: int, device: torch.device) -> GraphDraw | None:
        """Each row's temperature (0: greedy), uniform and filters, when a decode graph can
        draw this step itself (cuda_graphs.DecodeGraphs.run(draw=True)): one row a spec,
        nothing editing or reading their logits, and each row's filters within what the graph
        computes on the device (top_k up to GRAPH_TOP_K; top_p only beside a top_k, whose
        candidates then hold its threshold). None otherwise, and for plain greedy (whose graph
        takes the argmax alone). The uniforms are those `sample` would use, so the tokens are too."""
        spec_ids = list(map(id, specs))
        graph = self._graph
        if graph is None or graph.spec_ids != spec_ids:
            graph = self._graph = self._graph_batch(specs, spec_ids, vocab, device)
        if graph.draw is None:
            return None
        # Output positions, one per draw row, with no per-row Python (spec.output_pos is the definition).
        positions = np.fromiter(map(len, graph.tokens), dtype=np.int64, count=len(graph.tokens))
        uniforms = np.zeros(len(specs), dtype=np.float32)
        uniforms[graph.batch.draw_rows] = self._uniforms(positions - graph.position_offsets, graph.batch, 1)
        return dataclasses.replace(graph.draw, uniforms=uniforms)

    def _graph_batch(self, specs: list[SampleSpec], spec_ids: list[int], vocab: int,
                     device: torch.device) -> _GraphBatch:
        """in_graph's values for a new list of specs."""
        draws = False
        for spec in specs:
            if not spec.unshaped:
                return _GraphBatch(specs, spec_ids, None)
            draws = draws or not spec.params.greedy
        if not draws:  # plain greedy: decided without building the batch's key, which `sample` builds
            return _GraphBatch(specs, spec_ids, None)
        rows = [(spec, spec.seq_indices[0]) for spec in specs]
        if self._batch is None or self._batch.key != batch_key(rows):
            self._batch = BatchParams.build(rows, self.eos_token_ids, vocab, device)
        batch, f = self._batch, self._batch.filters
        if batch.all_greedy or f.max_k > GRAPH_TOP_K or f.top_p_without_k:
            return _GraphBatch(specs, spec_ids, None)
        n, at, v = len(rows), batch.draw_rows, batch.values
        temperature, no_uniforms = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
        temperature[at] = v.temperature
        if f.max_k or f.top_p is not None or f.min_p is not None:
            top_k, top_p, min_p = np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
            top_k[at], top_p[at], min_p[at] = v.top_k, v.top_p, v.min_p
            draw = GraphDraw(temperature, no_uniforms, top_k, top_p, min_p)
        else:
            draw = GraphDraw(temperature, no_uniforms)
        drawing = [specs[r] for r in at]
        offsets = np.array([s.num_prompt_tokens - len(s.drafted) for s in drawing], dtype=np.int64)
        return _GraphBatch(specs, spec_ids, batch, draw, [s.token_ids for s in drawing], offsets)

    def drawn(self, tokens: torch.Tensor, specs: list[SampleSpec]) -> SampledBatch:
        """The step's tokens, drawn by a decode graph after `in_graph` (`draw_in_graph`)."""
        return SampledBatch(tokens, specs, None, self._spare)

    # ---- processing ----------------------------------------------------------------------

    def _params(self, rows: list[Row], logits: torch.Tensor) -> BatchParams:
        if self._batch is None or self._batch.key != batch_key(rows):
            self._batch = BatchParams.build(rows, self.eos_token_ids, logits.shape[-1], logits.device)
        if self._batch.penalty_rows:
            self._counts.prepare([rows[r] for r in self._batch.penalty_rows], logits.shape[-1], logits.device)
        return self._batch

    def _process(self, logits: torch.Tensor, rows: list[Row], batch: BatchParams,
                 active_min: list[tuple[int, list[int]]], banned: list[tuple[int, int]] = ()) -> torch.Tensor:
        if batch.bias is not None:
            at, ids, values = batch.bias
            logits.index_put_((at, ids), values, accumulate=True)
        if batch.allowed is not None:
            at, mask = batch.allowed
            logits[at] = logits[at].masked_fill(~mask, float("-inf"))
        if banned:
            at, ids = (to_device(list(x), torch.long, logits.device) for x in zip(*banned, strict=True))
            logits[at, ids] = float("-inf")
        if batch.grammar_rows:
            apply_grammars(logits, [(r, rows[r][0].grammar) for r in batch.grammar_rows])
        if active_min:
            logits = self._mask_min_tokens(logits, rows, active_min)
        if batch.penalty_rows:
            index = batch.penalty_index
            rep, freq, pres = batch.penalties
            logits[index] = ops.penalize(logits[index], self._counts.counts, self._counts.prompt, rep, freq, pres)
        return logits

    def _mask_min_tokens(self, logits: torch.Tensor, rows: list[Row],
                         active: list[tuple[int, list[int]]]) -> torch.Tensor:
        pairs = [(r, t) for r, banned in active for t in banned]
        if not pairs:
            return logits
        at, ids = (to_device(list(x), torch.long, logits.device) for x in zip(*pairs, strict=True))
        masked = logits.clone()
        masked[at, ids] = float("-inf")  # a Python scalar: no host-to-device copy to wait for
        grammar = [r for r, _ in active if rows[r][0].grammar is not None]
        if grammar:  # a grammar that allows only the banned ids wins over min_tokens
            g = to_device(grammar, torch.long, logits.device)
            empty = ~torch.isfinite(masked[g]).any(dim=-1, keepdim=True)
            masked[g] = torch.where(empty, logits[g], masked[g])
        return masked

    def _draw(self, logits: torch.Tensor, rows: list[Row], batch: BatchParams) -> torch.Tensor:
        if batch.all_greedy:
            return logits.argmax(dim=-1)
        sub = logits if batch.draw_index is None else logits[batch.draw_index]
        positions = np.array([rows[r][0].output_pos for r in batch.draw_rows], dtype=np.int64)
        if logits.is_cuda:
            u = to_device(self._uniforms(positions, batch, 1), torch.float32, logits.device)
            drawn = draw_with_kernels(sub, batch.temperature, batch.filters, u)
        else:
            rounds = REJECTION_ROUNDS if batch.filters.top_p_without_k else 1
            u = to_device(self._uniforms(positions, batch, rounds), torch.float32, logits.device)
            drawn = Sampler._draw_rows(sub / batch.temperature[:, None], batch.filters, u)
        if batch.draw_index is None:
            return drawn
        return logits.argmax(dim=-1).index_copy_(0, batch.draw_index, drawn)

    @staticmethod
    def _draw_rows(x: torch.Tensor, f: ops.Filters, u: torch.Tensor) -> torch.Tensor:
        """Every row's draw on the CPU, where waiting costs nothing: each row takes the
        cheapest exact way its own parameters and logits allow (never another row's): a top_k
        row from its candidates when they hold every kept token, a top_p row without top_k by
        rejection, any other row from the whole row."""
        u0 = u if u.dim() == 1 else u[:, 0]
        has_k = f.top_k > 0 if f.top_k is not None else torch.zeros(x.shape[0], dtype=torch.bool)
        by_rejection = (f.top_p < 1.0) & ~has_k if f.top_p is not None else torch.zeros_like(has_k)
        if bool(by_rejection.all()):
            return Sampler._draw_by_rejection(x, f, u)
        if not bool(has_k.any()) and not bool(by_rejection.any()):
            return ops.draw_full(x, None, f.min_p, u0)
        tokens = torch.empty(x.shape[0], dtype=torch.long)
        if bool(by_rejection.any()):
            r = torch.nonzero(by_rejection)[:, 0]
            tokens[r] = Sampler._draw_by_rejection(x[r], _rows(f, r), u[r])
        rest = torch.nonzero(~by_rejection)[:, 0]
        xr, fr, ur = x[rest], _rows(f, rest), u0[rest]
        t = ops.thresholds(xr, fr, max(fr.max_k, CANDIDATES), check=CANDIDATES)
        drawn = torch.empty(len(rest), dtype=torch.long)
        candidates = has_k[rest] & t.inside
        if bool(candidates.any()):
            r = torch.nonzero(candidates)[:, 0]
            sub_t = ops.Thresholds(t.threshold[r], t.values[r], t.ids[r], None, None)
            drawn[r] = ops.draw_candidates(sub_t, _rows(fr, r).min_p, ur[r], min(CANDIDATES, t.values.shape[1]))
        if not bool(candidates.all()):
            r = torch.nonzero(~candidates)[:, 0]
            drawn[r] = ops.draw_full(xr[r], t.threshold[r], _rows(fr, r).min_p, ur[r])
        tokens[rest] = drawn
        return tokens

    @staticmethod
    def _draw_by_rejection(x: torch.Tensor, f: ops.Filters, u: torch.Tensor) -> torch.Tensor:
        """Top_p rows without top_k (their only threshold is top_p's)."""
        tokens, done = ops.draw_top_p_by_rejection(ops.kept_weights(x, None, f.min_p), f.top_p, u)
        if not bool(done.all()):  # after REJECTION_ROUNDS rounds (rare): the exact threshold by a full sort
            r = torch.nonzero(~done)[:, 0]
            sub = _rows(f, r)
            t = ops.thresholds(x[r], sub, x.shape[1])
            tokens[r] = ops.draw_full(x[r], t.threshold, sub.min_p, u[r, 0])
        return tokens

    def _uniforms(self, positions: np.ndarray, batch: BatchParams, rounds: int) -> np.ndarray:
        """The draw rows' uniforms, at their output `positions` (seeded rows' key)."""
        seeded = ops.counter_uniforms(ops.SEEDED_STREAM, batch.seeds, batch.seq_index, positions, rounds)
        if batch.seeded.all():
            return seeded
        n = len(batch.draw_rows)
        draws = np.arange(self._draws, self._draws + n)
        unseeded = ops.counter_uniforms(ops.ENGINE_STREAM, np.full(n, self._seed), draws, np.zeros(n), rounds)
        self._draws += n
        mask = batch.seeded if rounds == 1 else batch.seeded[:, None]
        return np.where(mask, seeded, unseeded)


def draw_with_kernels(logits: torch.Tensor, temperature: torch.Tensor, f: ops.Filters,
                      u: torch.Tensor) -> torch.Tensor:
    """Every row's draw on a GPU without waiting for the device, reading the logits in their
    own dtype: top_k and top_p become one threshold per row, then kernels/sample.draw scales,
    filters and draws each whole row. A row's token is a function of its own logits,
    parameters and uniform: a decode graph draws all its rows (greedy and padding ones too)
    and gets the eager subset's tokens (test_sampler_gpu checks it)."""
    threshold = device_threshold(logits, temperature, f) if f.max_k or f.top_p is not None else None
    return draw_kernel(logits, temperature, threshold, f.min_p, u)


def device_threshold(logits: torch.Tensor, temperature: torch.Tensor, f: ops.Filters) -> torch.Tensor:
    """ops.thresholds' threshold of each row, without the float32 copy of the scaled rows:
    the top_k candidates' values (kernels/sample.top_values; the whole row sorted for top_p
    alone) scaled by temperature (x = logit / T, the same float32 values in the same order),
    and top_p's denominator over the whole row from one read of the logits
    (kernels/sample.kept_mass). Nothing here reads a device value on the host: a decode
    graph captures it (`draw_in_graph`)."""
    vocab = logits.shape[1]
    width = candidates_width(f, vocab)
    if width == vocab:
        values = torch.topk(logits, width, dim=-1).values.float()
    else:
        values = top_values(logits, width)  # chunked: the candidates' ids are not needed here
    values = values / temperature[:, None]

    def mass(threshold, top, kept_w, held):
        if width == vocab:
            return kept_w.sum(dim=-1)
        return torch.where(held, kept_w.sum(dim=-1), kept_mass(logits, temperature, threshold, f.min_p, top[:, 0]))

    return ops.from_candidates(values, None, f, vocab, None, mass).threshold


def candidates_width(f: ops.Filters, vocab: int) -> int:
    """How many candidates `device_threshold` takes: every token for top_p without top_k,
    else GRAPH_TOP_K (what a decode graph takes) or the batch's largest top_k past it."""
    width = vocab if f.top_p_without_k else max(f.max_k, GRAPH_TOP_K)
    return min(width, vocab)


def draw_in_graph(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor,
                  filters: ops.Filters | None = None) -> torch.Tensor:
    """A decode graph's draw over all its rows (cuda_graphs.DecodeGraphs), from the values
    Sampler.in_graph staged: temperature [R] (0: greedy, whose token the caller takes from
    the argmax), uniforms [R] and, where a row filters, `filters` (top_k [R] at most
    GRAPH_TOP_K, top_p [R], min_p [R]; max_k GRAPH_TOP_K). The same tokens as
    Sampler.sample for the same uniforms: the GPU path is the eager one's (draw_with_kernels:
    thresholds from GRAPH_TOP_K candidates, then the draw kernel) with shapes fixed at
    capture and no host sync; the CPU path is the eager sampler's own (on the CPU nothing
    is captured)."""
    temperature = torch.where(temperature > 0.0, temperature, 1.0)  # greedy rows: any draw, discarded
    if logits.is_cuda:
        return draw_with_kernels(logits, temperature, filters or NO_FILTERS, u)
    x = logits.float() / temperature[:, None]
    return ops.draw_full(x, None, None, u) if filters is None else Sampler._draw_rows(x, filters, u)


NO_FILTERS = ops.Filters(None, None, None, 0, False)


def _completing_bad_words(rows: list[Row], bad_word_rows: list[int]) -> list[tuple[int, int]]:
    """(row, token id) for each bad word of several tokens whose other tokens end the row's output."""
    banned = []
    for r in bad_word_rows:
        spec = rows[r][0]
        output = spec.token_ids[spec.num_prompt_tokens:]
        for word in spec.bad_words:
            head = len(word) - 1
            if head and len(output) >= head and tuple(output[len(output) - head:]) == word[:-1]:
                banned.append((r, word[-1]))
    return banned


def _rows(f: ops.Filters, rows: torch.Tensor) -> ops.Filters:
    """The filters of some rows."""
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    return ops.Filters(pick(f.top_k), pick(f.top_p), pick(f.min_p), f.max_k, f.top_p_without_k)


class SampledBatch:
    """One step's sampled tokens: on the device at once, on the host after `result()`."""

    def __init__(self, token_ids: torch.Tensor, specs: list[SampleSpec], logprobs: ops.LogprobTensors | None,
                 spare: list[torch.Tensor], logprob_rows: list[tuple[int, int]] | None = None) -> None:
        self.token_ids = token_ids  # [rows] int64, one row per (spec, seq index) in order
        self.specs = specs
        self._logprob_rows = logprob_rows or []  # (row, top N) of the rows that want logprobs
        self._ready: torch.cuda.Event | None = None
        self._spare = spare
        self._buffer: torch.Tensor | None = None
        self._flat: list[int] | None = None
        self._lp_host = _logprobs_to_host(logprobs) if logprobs is not None else None
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
        if self._lp_host is None and len(flat) == len(self.specs):
            # The usual step: every spec one row (n >= 1, so one seq index each), no logprobs.
            return [[SampledToken(token_id, None)] for token_id in flat]
        lps = self._logprob_dicts(flat)
        out: list[list[SampledToken]] = []
        k = 0
        for spec in self.specs:
            group = []
            for _ in spec.seq_indices:
                group.append(SampledToken(flat[k], lps.get(k)))
                k += 1
            out.append(group)
        return out

    def _logprob_dicts(self, flat: list[int]) -> dict[int, dict[int, Logprob]]:
        if self._lp_host is None:
            return {}
        chosen, rank, values, ids = (None if t is None else t.tolist() for t in self._lp_host)
        result = {}
        for i, (row, top_n) in enumerate(self._logprob_rows):
            d = {flat[row]: Logprob(chosen[i], rank[i])}
            for j in range(top_n):
                d.setdefault(ids[i][j], Logprob(values[i][j], j + 1))
            result[row] = d
        return result


def _logprobs_to_host(lp: ops.LogprobTensors) -> tuple[torch.Tensor | None, ...]:
    """Start the logprobs' copy to the host (pinned, behind the step's kernels on a GPU)."""
    tensors = (lp.chosen, lp.rank, lp.top_values, lp.top_ids)
    if not lp.chosen.is_cuda:
        return tensors
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.append(host.copy_(t, non_blocking=True))
    return tuple(out)
