"""The model runner: the only place that builds tensors and touches the device.

It owns the model, the paged KV cache and the sampler. Each step it takes the scheduler's
`StepPlan`, lays the step's tokens out flat (decodes first, then prefill chunks), runs the
forward, computes logits only for the rows that sample, and returns the sampled tokens.
Decode-only steps on a GPU replay a captured CUDA graph (cuda_graphs.py), and so does a step
that is one sequence's prompt chunk alone (a batch-1 request's first token). It never
reaches back into scheduler state.

`execute` only queues the step on the device and returns its `LaunchedStep`; the tokens are
read back with `LaunchedStep.result()`. So the engine can plan the next step meanwhile: a
decode whose input is still a `PENDING_TOKEN` takes the token the previous step sampled, by a
gather on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kernels.cache import from_cache, is_fp8, to_cache
from services.engine.attention import AttentionBackend, AttentionContext, AttentionMetadata
from services.engine.block_table import BlockTableRows
from services.engine.config import EngineLayout
from services.engine.cuda_graphs import DecodeGraphs, PrefillGraphs, decode_splits
from services.engine.kv_transfer import KVTransferError
from services.engine.layers import linear
from services.engine.models.config import ModelConfig
from services.engine.outputs import Logprob, SampledToken
from services.engine.parallel.driver import ParallelDriver
from services.engine.prompt_logprobs import PromptLogprobs, PromptRows
from services.engine.sampler import SampledBatch, Sampler
from services.engine.scheduler import ScheduledSeq, StepPlan
from services.engine.sequence import PENDING_TOKEN
from services.engine.spec import verify

log = logging.getLogger("pdserve.engine")


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled]: rows of the final hidden states to sample from
    sampled_seqs: list[ScheduledSeq]  # in logits row order
    pending_at: torch.Tensor  # [k]: positions of input_ids that are PENDING_TOKENs ...
    pending_from: torch.Tensor  # [k]: ... and their rows in the previous step's sampled tokens
    prompt_rows: PromptRows | None = None  # rows that score prompt tokens (prompt_logprobs)


class LaunchedStep:
    """A step queued on the device; `result()` waits for its sampled tokens."""

    def __init__(self, sampled_seqs: list[ScheduledSeq], batch: SampledBatch | None,
                 prompt: PromptLogprobs | None = None, speculating: bool = False) -> None:
        self._seqs = sampled_seqs
        self._batch = batch
        self._prompt = prompt
        self._speculating = speculating

    def prompt_logprobs(self) -> dict[int, tuple[int, list[dict[int, Logprob]]]]:
        """seq_id -> (first prompt position scored, its logprobs), for prompt_logprobs requests."""
        return self._prompt.result() if self._prompt is not None else {}

    def result(self) -> dict[int, list[SampledToken]]:
        """seq_id -> sampled token(s), for the sequences that sample (a speculating one's:
        its accepted drafts, then the target's next token)."""
        if self._batch is None:
            return {}
        groups = self._batch.result()
        if self._speculating:
            return verify.accepted(self._seqs, groups)
        return {s.seq_id: group for s, group in zip(self._seqs, groups, strict=True)}


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        model_config: ModelConfig,
        layout: EngineLayout,
        backend: AttentionBackend,
        sampler: Sampler,
        cuda_graph_max_batch: int = 0,  # 0: no CUDA graphs for decode steps
        cuda_graph_max_prefill: int = 0,  # most tokens of a one-chunk step replayed from a graph; 0: none
        max_rows: int = 256,  # sequences in flight at once (grows if exceeded)
        driver: ParallelDriver | None = None,  # tensor or pipeline parallel: the other ranks run each step too
    ) -> None:
        self.model = model
        self.driver = driver
        self.layout = layout
        self.backend = backend
        self.sampler = sampler
        self.device = layout.device
        self.block_size = layout.block_size
        self.num_kv_heads = model_config.num_kv_heads
        if self.device.type == "cpu":  # which matmul form this CPU runs faster (layers/linear.py)
            weights = [m.weight for m in model.modules()
                       if isinstance(m, nn.Linear) and isinstance(m.weight, torch.Tensor)]  # not quantized
            log.info("few-row CPU matmuls as (W @ x^T)^T: %s", linear.choose_cpu_orientation(weights))
        # One tensor for the whole pool, indexed (layers, K/V, blocks, block_size, kv_heads,
        # head_dim). On a GPU it is stored head-major inside each block: a block's tokens of one
        # KV head are block_size * head_dim contiguous elements, so decode attention, which reads
        # one KV head per program, reads whole runs instead of head_dim-wide pieces a token row
        # apart (H200: 1-4 points more of the copy bandwidth, BENCHMARKS.md). On the CPU it is
        # stored as indexed: the torch backend gathers whole blocks (index_select), which is a
        # plain copy only in that order. Every kernel and copy takes the strides, so nothing
        # else sees the difference.
        self.kv_cache = kv_pool(model_config, layout)
        self.kv_caches = [(layer[0], layer[1]) for layer in self.kv_cache]
        # An fp8 cache's per-tensor scales, [layers, 2 (K, V)] float32 (kernels/cache.py), and as
        # floats for the kernels. All 1: e4m3's +-448 covers the default model's K and V (|x| < 21)
        # unscaled, and per-tensor amax scales measured no more accurate (BENCHMARKS.md).
        self.kv_scales = torch.ones(model_config.num_layers, 2) if is_fp8(layout.kv_dtype) else None
        self._kv_scale_pairs = ([(k, v) for k, v in self.kv_scales.tolist()] if self.kv_scales is not None
                                else None)
        max_blocks = -(-layout.max_model_len // layout.block_size)
        self.tables = BlockTableRows(max_rows, max_blocks, self.device)
        # The last step's sampled tokens on the device, and each single-token sequence's row
        # in them: where the next step's PENDING_TOKEN inputs come from.
        self._last_tokens: torch.Tensor | None = None
        self._last_rows: dict[int, int] = {}
        self.graphs: DecodeGraphs | None = None
        if cuda_graph_max_batch and self.device.type == "cuda":
            self.graphs = DecodeGraphs(model, backend, self.kv_caches, cuda_graph_max_batch, self.tables.device_table,
                                       self.num_kv_heads, self.device, self._kv_scale_pairs)
            self.graphs.capture()
        self.prefill_graphs: PrefillGraphs | None = None
        if cuda_graph_max_prefill >= 16 and self.device.type == "cuda":
            self.prefill_graphs = PrefillGraphs(model, backend, self.kv_caches, cuda_graph_max_prefill,
                                                self.tables.device_table, self.device, self._kv_scale_pairs)
            self.prefill_graphs.capture()

    @torch.inference_mode()
    def execute(self, plan: StepPlan, after_layer: Callable[[int], None] | None = None) -> LaunchedStep:
        """Queue one step on the device: forward, logits, sampling. A step with speculative
        drafts runs eager (graphs hold one logits row per sequence) and scores every position
        of each speculating sequence (spec/verify.py). `after_layer(layer)` runs once each
        layer's K/V is written (AttentionContext): such a step runs eager too."""
        if plan.block_copies:
            self.copy_blocks(plan.block_copies)
        graphs, prefill_graphs, seqs = self.graphs, self.prefill_graphs, plan.seqs
        # Graphs compute the sampling rows' logits only: not for steps that score prompt tokens,
        # nor for speculative drafts (every draft position is scored).
        speculating = any(s.num_draft_tokens for s in seqs)
        eager = speculating or after_layer is not None
        decode_graph = (after_layer is None and graphs is not None and 0 < len(seqs) <= graphs.max_batch
                        and all(len(s.token_ids) == 1 and s.prompt_logprobs is None for s in seqs))
        prefill_graph = (not decode_graph and not eager and prefill_graphs is not None and len(seqs) == 1
                         and prefill_graphs.fits(len(seqs[0].token_ids)) and seqs[0].prompt_logprobs is None)
        if decode_graph or prefill_graph:
            # the rows first: taking one may grow (reallocate) the tables the graphs gather from
            rows = [self.tables.row(s.seq_id, s.block_table) for s in seqs]
            decode_graph = decode_graph and graphs.holds(self.tables.device_table)
            prefill_graph = prefill_graph and prefill_graphs.holds(self.tables.device_table)
        argmax, prompt, drawn = None, None, False
        if decode_graph:
            logits, sampled_seqs, argmax, drawn = self._run_graph(plan, rows)
        elif prefill_graph:
            logits, sampled_seqs, argmax = self._run_prefill_graph(seqs[0], rows[0])
        else:
            inputs = self._prepare(plan.seqs)
            if inputs.pending_at.numel():
                inputs.input_ids[inputs.pending_at] = self._last_tokens[inputs.pending_from]
            if self.driver is not None:
                self.driver.step(inputs.input_ids, inputs.positions, inputs.meta, inputs.logits_indices,
                                 inputs.prompt_rows.rows if inputs.prompt_rows is not None else [])
            ctx = AttentionContext(self.backend, self.kv_caches, inputs.meta, self._kv_scale_pairs, after_layer)
            hidden = self.model(inputs.input_ids, inputs.positions, ctx)
            logits = self.model.compute_logits(hidden[inputs.logits_indices])
            sampled_seqs = inputs.sampled_seqs
            if inputs.prompt_rows is not None:
                prompt = inputs.prompt_rows.compute(self.model, hidden)
        if not sampled_seqs:
            return LaunchedStep([], None, prompt)
        specs = verify.row_specs(sampled_seqs) if speculating else [s.sample for s in sampled_seqs]
        batch = self.sampler.drawn(argmax, specs) if drawn else self.sampler.sample(logits, specs, argmax)
        self._last_tokens = batch.token_ids
        if batch.token_ids.shape[0] == len(sampled_seqs):  # the usual step: a row each (no fork, no drafts)
            self._last_rows = {s.seq_id: row for row, s in enumerate(sampled_seqs)}
        else:
            self._last_rows, row = {}, 0
            for s in sampled_seqs:
                width = len(s.sample.seq_indices) + s.num_draft_tokens
                if width == 1:
                    self._last_rows[s.seq_id] = row
                row += width
        return LaunchedStep(sampled_seqs, batch, prompt, speculating)

    @torch.inference_mode()
    def forward_last(self, model: nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                     seqs: list[ScheduledSeq]) -> tuple[torch.Tensor, list[ScheduledSeq]]:
        """A forward of another model (a speculative draft) over the same block tables, with
        its own caches: the logits of each sequence's last token, and the sequences in the
        order of those rows (each needs a `sample`)."""
        inputs = self._prepare(seqs)
        scales = self._kv_scale_pairs if kv_caches is self.kv_caches else None  # a draft's own pool: unscaled
        hidden = model(inputs.input_ids, inputs.positions, AttentionContext(self.backend, kv_caches, inputs.meta, scales))
        return model.compute_logits(hidden[inputs.logits_indices]), inputs.sampled_seqs

    def _run_graph(self, plan: StepPlan,
                   rows: list[int]) -> tuple[torch.Tensor, list[ScheduledSeq], torch.Tensor | None, bool]:
        """A decode-only step through the CUDA graphs (cuda_graphs.py): inputs staged with one
        copy, then the replay, which gathers the pending tokens and the block tables itself.
        Returns the logits of the rows that sample, those sequences, the graph's tokens when
        every row samples (the logits' argmax), and whether the graph drew them itself
        (Sampler.in_graph: then they are the step's tokens)."""
        graphs, seqs, last = self.graphs, plan.seqs, self._last_tokens
        input_ids, pending_at, pending_from, positions, slots, sampled, logits_indices = self._decode_inputs(seqs)
        n = len(seqs)
        if len(sampled) == n:
            logits_indices = []  # every row samples: no gather
        gather = bool(pending_at) and not graphs.owns(last)
        draw = None
        if len(sampled) == n:
            draw = self.sampler.in_graph([s.sample for s in sampled], self.layout.vocab_size, self.device)
        graphs.stage(input_ids, positions, slots, rows, [p + 1 for p in positions], pending_at, pending_from,
                     logits_indices, gather, draw)
        self.tables.upload()
        if gather:  # the last step's tokens come from an eager step or the sampler's own draw
            graphs.take_tokens(last, n)
        if not sampled and graphs.owns(last):
            self._last_tokens = last.clone()  # the replay overwrites them, and nothing replaces them
        logits = graphs.run(n, draw is not None, draw is not None and draw.filtered)  # one token per row: index = row
        if logits_indices:  # drop the rows that do not sample
            return logits[graphs.logits_indices[: len(sampled)]], sampled, None, False
        return logits, sampled, graphs.tokens[:n], draw is not None

    def _run_prefill_graph(self, seq: ScheduledSeq, row: int) -> tuple[torch.Tensor, list[ScheduledSeq], torch.Tensor]:
        """A step of one prompt chunk through the prefill graphs (cuda_graphs.py): the chunk
        staged with one copy, then the replay. Returns its last token's logits, the sequence if
        it samples, and the logits' argmax."""
        graphs, n = self.prefill_graphs, len(seq.token_ids)
        graphs.stage(seq.token_ids, seq.start_pos, self.tables.slots(row, seq.start_pos, n, self.block_size), row)
        self.tables.upload()
        if seq.sample is None and graphs.owns(self._last_tokens):
            self._last_tokens = self._last_tokens.clone()  # the replay overwrites them, and nothing replaces them
        logits = graphs.run(n)
        return logits, [seq] if seq.sample is not None else [], graphs.tokens

    def read_block(self, block_id: int, num_tokens: int) -> torch.Tensor:
        """A copy of one block's first `num_tokens` slots, on the host: [layers, 2, num_tokens, kv_heads, dim]."""
        if self.driver is not None:  # every rank's heads
            return self.driver.read_block(self.kv_cache, block_id, num_tokens).to("cpu")
        return self.kv_cache[:, :, block_id, :num_tokens].to("cpu", copy=True)

    def read_layer(self, layer: int, block_id: int, num_tokens: int) -> torch.Tensor:
        """A host copy of one layer of one block: [1, 2, num_tokens, kv_heads, dim]. On a GPU
        this waits for the step so far (a synchronous copy; an async copy stream is future work)."""
        return self.kv_cache[layer : layer + 1, :, block_id, :num_tokens].to("cpu", copy=True)

    def write_block(self, block_id: int, data: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        """Fill one block's first data.shape[2] slots (a received block) from host memory, or
        from a peer's pool on this GPU (mapped by CUDA IPC). An fp8 block comes with its
        sender's scales ([layers, 2]); where they differ from ours it is requantized to ours."""
        data = data.to(self.device)
        if self.kv_scales is not None:
            if scales is None or scales.shape != self.kv_scales.shape:
                raise KVTransferError(f"an fp8 block needs its {tuple(self.kv_scales.shape)} scales")
            if not torch.equal(scales, self.kv_scales):
                ratio = (scales / self.kv_scales).to(self.device)[:, :, None, None, None]
                data = to_cache(from_cache(data, torch.float32) * ratio, self.kv_cache.dtype)
        if self.driver is not None:  # each rank keeps its heads
            self.driver.write_block(self.kv_cache, block_id, data)
            return
        self.kv_cache[:, :, block_id, : data.shape[2]] = data.to(self.kv_cache.dtype)

    def synchronize(self) -> None:
        """Wait for every kernel and copy this process has queued on the device."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if self.driver is not None:
            self.driver.copy_blocks(copies, self.device)
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def release(self, seq_ids: tuple[int, ...]) -> None:
        """Forget finished and preempted sequences (StepPlan.released_seq_ids)."""
        self.tables.release(seq_ids)

    def _decode_inputs(self, decodes: list[ScheduledSeq]) -> tuple[list, list, list, list, list, list, list]:
        """The one-token sequences' host inputs, in order: input ids, which of them are
        PENDING_TOKENs and their rows in the last step's samples, positions, cache slots, the
        sequences that sample and their rows."""
        bs = self.block_size
        input_ids = [s.token_ids[0] for s in decodes]
        pending_at = [i for i, t in enumerate(input_ids) if t == PENDING_TOKEN]
        pending_from = [self._last_rows[decodes[i].seq_id] for i in pending_at]
        positions = [s.start_pos for s in decodes]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(decodes, positions)]
        sampled = [s for s in decodes if s.sample is not None]
        logits_indices = [i for i, s in enumerate(decodes) if s.sample is not None]
        return input_ids, pending_at, pending_from, positions, slots, sampled, logits_indices

    def _prepare(self, seqs: list[ScheduledSeq]) -> StepInputs:
        """Lay the step out flat (decodes first) and copy it to the device in two transfers.

        Every segment of the two packed tensors starts 16-byte aligned: Triton specialises a
        kernel on its pointers' alignment, so unaligned views would compile new variants
        whenever the step's shape changed. (A CUDA-graph step stages its inputs itself:
        _run_graph.)
        """
        row_of = self.tables.row
        decodes = [s for s in seqs if len(s.token_ids) == 1]
        prefills = [s for s in seqs if len(s.token_ids) > 1]
        nd, npf = len(decodes), len(prefills)
        rows = [row_of(s.seq_id, s.block_table) for s in decodes + prefills]
        input_ids, pending_at, pending_from, positions, slots, sampled, logits_indices = self._decode_inputs(decodes)
        query_start = [0]
        pf_pos, pf_slots = [], []
        prompt_rows = PromptRows() if any(s.prompt_logprobs is not None for s in seqs) else None
        if prompt_rows is not None:
            for i, s in enumerate(decodes):  # a one-token chunk of a prompt
                if s.prompt_logprobs is not None:
                    prompt_rows.add(s, i)
        for s, row in zip(prefills, rows[nd:]):
            n = len(s.token_ids)
            if s.prompt_logprobs is not None:
                prompt_rows.add(s, nd + query_start[-1])
            input_ids.extend(s.token_ids)
            pf_pos.append(np.arange(s.start_pos, s.start_pos + n))
            pf_slots.append(self.tables.slots(row, s.start_pos, n, self.block_size))
            query_start.append(query_start[-1] + n)
            if s.sample is not None:
                # a speculating sequence samples at its drafts' positions too (spec/verify.py)
                logits_indices.extend(range(nd + query_start[-1] - 1 - s.num_draft_tokens, nd + query_start[-1]))
                sampled.append(s)
        _, views = _pack([input_ids, _concat(positions, pf_pos), _concat(slots, pf_slots), logits_indices, rows,
                          pending_at, pending_from], np.int64, self.device)
        _, lens = _pack([[s.start_pos + 1 for s in decodes], query_start,
                             [s.start_pos + len(s.token_ids) for s in prefills]], np.int32, self.device)
        table = self.tables.upload()
        row_index = views[4]
        meta = AttentionMetadata(
            slot_mapping=views[2],
            num_decode_tokens=nd,
            decode_block_tables=table.index_select(0, row_index[:nd]),
            decode_seq_lens=lens[0],
            prefill_block_tables=table.index_select(0, row_index[nd:]),
            prefill_query_start_loc=lens[1],
            prefill_seq_lens=lens[2],
            prefill_max_query_len=max((len(s.token_ids) for s in prefills), default=0),
            decode_split=decode_splits(nd, self.num_kv_heads, self.device),
        )
        return StepInputs(
            input_ids=views[0],
            positions=views[1],
            meta=meta,
            logits_indices=views[3],
            sampled_seqs=sampled,
            pending_at=views[5],
            pending_from=views[6],
            prompt_rows=prompt_rows,
        )


def kv_pool(model_config: ModelConfig, layout: EngineLayout) -> torch.Tensor:
    """A zeroed KV pool for `model_config`'s layers: (layers, K/V, blocks, block_size, kv_heads,
    head_dim) as indexed, stored head-major on a GPU (see ModelRunner.__init__)."""
    head_major = layout.device.type == "cuda"
    inner = ((model_config.num_kv_heads, layout.block_size) if head_major
             else (layout.block_size, model_config.num_kv_heads))
    pool = torch.zeros(model_config.num_layers, 2, layout.num_kv_blocks, *inner, model_config.head_dim,
                       dtype=layout.kv_dtype, device=layout.device)
    return pool.transpose(3, 4) if head_major else pool


_TORCH_INTS = {np.int64: torch.int64, np.int32: torch.int32}


def _concat(head: list[int], arrays: list[np.ndarray]) -> list[int] | np.ndarray:
    """The decodes' values (a list), then the prefills' (arrays)."""
    return np.concatenate([np.asarray(head, dtype=np.int64), *arrays]) if arrays else head


def _pack(segments: list, dtype, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One host-to-device copy of several int segments, each starting 16-byte aligned;
    returns the device tensor and a view per segment.

    The host side is pinned memory (from torch's caching host allocator, which does not hand
    a buffer out again before its copy is done): a copy from pageable memory may wait for the
    work already queued, which would undo async scheduling."""
    align = 16 // np.dtype(dtype).itemsize
    offsets, total = [], 0
    for seg in segments:
        offsets.append(total)
        total += -(-len(seg) // align) * align
    staging = torch.empty(max(total, 1), dtype=_TORCH_INTS[dtype], pin_memory=device.type == "cuda")
    host = staging.numpy()
    for seg, off in zip(segments, offsets):
        if len(seg):
            host[off : off + len(seg)] = seg
    packed = staging.to(device, non_blocking=True)
    return packed, [packed[off : off + len(seg)] for seg, off in zip(segments, offsets)]
