"""CUDA graphs for decode steps: one captured forward (+ logits) per batch-size bucket.

A decode step launches a few hundred small kernels; from Python each costs ~10 us, far more
than the GPU work of a small batch. Capturing the whole forward once per bucket and replaying
it makes a step one launch. At batch 1 the GPU's part is ~0.5 ms, so the host's own torch
calls are what is left of a step; a step makes three: the staging copy, the replay and (the
sampler's) the copy of its tokens back. Everything else a step needs is inside the graph:

    one int64 buffer:  tokens | input ids | positions | slots | table rows | source | ...
                       ^ the last replay's tokens (written by the graph)

    graph:  ids    = buffer[:2n][source]        # a pending input: the token sampled a step ago
            tables = persistent_tables[rows]    # block_table.py's device rows
            logits = model(ids, positions, ...)
            tokens = argmax(logits)             # the sampler's, when every row is plain greedy
                                                # (kernels/argmax.py; torch's on the CPU)

Each bucket has two more graphs that also draw: where a row's staged temperature is above
zero, its token is the draw of kernels/sample.py with the staged uniform (the sampler's
own, Sampler.in_graph), else the argmax. One draws with temperature alone; the other also
filters with each row's staged top_k (up to sampler.GRAPH_TOP_K), top_p and min_p, its
thresholds computed on the device (sampler.draw_in_graph). A step whose rows are greedy or
sample within those limits (nothing that edits or reads the logits, no top_k past the cap,
no top_p without a top_k) runs one of them: the sampler then launches nothing, and the next
step reads the tokens in the graph.

`stage` writes the step's host values behind the tokens with one host-to-device copy, from
one of two pinned buffers (each reused once its last copy is done). A row's source is its
own input id (n + i) or, for a PENDING_TOKEN, the last step's token row. Where the last
step's tokens are not the graph's own (an eager step, or a sampler that drew them),
`take_tokens` gathers them into the tokens segment first. The rows past the real batch are
padding: token 0 at position 0, slot -1 (nothing is written to the cache), length 1 and
table row 0 (a harmless read of a valid block).

On the CPU (tests) there is nothing to capture: `run` calls the same forward eagerly, so the
staging, the in-graph gathers and the padding rows run in CI too.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from torch import nn

from kernels.argmax import argmax, argmax_ref
from services.engine.attention import AttentionBackend, AttentionContext, AttentionMetadata
from services.engine.sampler import GRAPH_TOP_K, GraphDraw, draw_in_graph
from services.engine.sampling_ops import Filters

log = logging.getLogger("pdserve.engine")

_SEGMENTS = ("tokens", "input_ids", "positions", "slots", "rows", "source", "gather_from", "logits_indices", "top_k")


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(batch: int, num_kv_heads: int, device: torch.device) -> tuple[int, int, int]:
    """Flash-decoding's (most splits, fewest tokens per split, tokens per tile) for a decode
    batch (kernels/paged_attention.py; each triple is a compiled kernel variant, fixed per
    graph), by how many (sequence, KV head) programs the batch has against the SMs:

    - fewer than the SMs (small batches): every sequence cut into one-tile (64-token) ranges,
      enough programs to fill the GPU twice, rounded up to a power of two;
    - 1-3 per SM: 128-token tiles (twice the tokens a program has in flight), sequences
      past 512 tokens split in up to 4;
    - 3-5 per SM: 128-token tiles, only sequences past 1024 tokens split: the programs fill
      the SMs without splitting, and a split costs its partials and the merge;
    - 5 or more per SM (large ragged batches): 64-token tiles, sequences past 512 tokens split,
      so that the longest sequences do not leave a tail of busy SMs.

    From loadtest/profile_gpu.py's `splits` and `policy` sweeps on an H200 (BENCHMARKS.md):
    at 64 x 1k tokens of Llama-1B's shape, 128-token tiles without splits take 38 us where
    (4, 512, 64) took 49; on ragged batches of 256 sequences (4, 512, 64) is level with the
    best 128-token setting (Llama-1B) or 4% ahead of it (SmolLM2)."""
    if device.type != "cuda" or batch == 0:
        return 1, 64, 64
    programs, sms = batch * num_kv_heads, _num_sms(device)
    if programs < sms:
        wanted = -(-2 * sms // programs)
        return min(16, 1 << (wanted - 1).bit_length()), 64, 64
    if programs < 3 * sms:
        return 4, 512, 128
    if programs < 5 * sms:
        return 4, 1024, 128
    return 4, 512, 64


def buckets_up_to(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return sorted({b for b in sizes if b <= max_batch} | {max_batch})


def _capture(forward, sizes: list[int], device: torch.device,
             pool=None) -> tuple[dict[int, torch.cuda.CUDAGraph], dict, object]:
    """One CUDA graph of forward(size) per size, largest first (the later ones reuse its
    memory pool, or `pool`), each run once before its capture (Triton compiles there).
    Returns the graphs, the outputs they write and their memory pool."""
    graphs, outputs = {}, {}
    for size in sorted(sizes, reverse=True):
        forward(size)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[size] = forward(size)
        pool = graph.pool()
        graphs[size] = graph
    torch.cuda.synchronize(device)
    return graphs, outputs, pool


class _PinnedStaging:
    """Two pinned host copies of a device buffer, filled in turn: each is written again only
    once its last host-to-device copy is done (an event), so a step never waits for the one
    before it."""

    def __init__(self, device_buffer: torch.Tensor) -> None:
        self.device_buffer = device_buffer
        pin = device_buffer.device.type == "cuda"
        # Zeroed: a fresh pinned block may be one this process freed (an earlier engine's), and
        # whatever a step leaves unwritten is uploaded too.
        self._host = [torch.zeros(device_buffer.shape, dtype=device_buffer.dtype, pin_memory=pin) for _ in range(2)]
        self._copied = [torch.cuda.Event() for _ in range(2)] if pin else None
        self._turn = 0

    def next(self) -> np.ndarray:
        """The host buffer to fill for this step (its copy two steps ago is long done)."""
        self._turn = 1 - self._turn
        if self._copied is not None:
            self._copied[self._turn].synchronize()
        return self._host[self._turn].numpy()

    def upload(self, start: int = 0) -> None:
        """Copy the buffer just filled, from `start` on, to the device (asynchronously)."""
        self.device_buffer[start:].copy_(self._host[self._turn][start:], non_blocking=True)
        if self._copied is not None:
            self._copied[self._turn].record()


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        max_batch: int,
        table: torch.Tensor,  # [rows, max_blocks] int32: the persistent block tables (block_table.py)
        num_kv_heads: int,
        device: torch.device,
        kv_scales: list[tuple[float, float]] | None = None,  # an fp8 cache's, per layer (attention.py)
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.kv_scales = kv_scales
        self.device = device
        self.table = table
        self.buckets = buckets_up_to(max_batch)
        self.max_batch = self.buckets[-1]
        self.num_kv_heads = num_kv_heads
        n = self.width = self.max_batch + self.max_batch % 2
        # Every per-step value in one int64 buffer, n entries a segment (_SEGMENTS), then the
        # lengths as int32 pairs, then the draw's temperatures, uniforms, top_p and min_p as
        # float32 pairs; `stage` fills all but the tokens with one copy.
        lens_at = len(_SEGMENTS) * n
        self._staged = torch.zeros(lens_at + n // 2 + 2 * n, dtype=torch.long, device=device)
        (self.tokens, self.input_ids, self.positions, self.slots, self.rows, self.source, self.gather_from,
         self.logits_indices, self.top_k) = self._staged[:lens_at].view(len(_SEGMENTS), n)
        self.seq_lens = self._staged[lens_at: lens_at + n // 2].view(torch.int32)
        self.temperature, self.uniforms, self.top_p, self.min_p = \
            self._staged[lens_at + n // 2:].view(torch.float32).view(4, n)
        self.slots.fill_(-1)
        self.seq_lens.fill_(1)
        self.top_p.fill_(1.0)
        self._own_ids = np.arange(n, 2 * n)  # a row's source: its own input id
        self.source.copy_(torch.from_numpy(self._own_ids))
        self.block_tables = torch.zeros(n, table.shape[1], dtype=torch.int32, device=device)
        self._empty_i32 = torch.zeros(0, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.draw_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.draw_logits: dict[int, torch.Tensor] = {}
        self.filter_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.filter_logits: dict[int, torch.Tensor] = {}
        self._host = _PinnedStaging(self._staged)

    def _metadata(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:batch],
            num_decode_tokens=batch,
            decode_block_tables=self.block_tables[:batch],
            decode_seq_lens=self.seq_lens[:batch],
            prefill_block_tables=self._empty_i32.view(0, 0),
            prefill_query_start_loc=torch.zeros(1, dtype=torch.int32, device=self.device),
            prefill_seq_lens=self._empty_i32,
            decode_split=decode_splits(batch, self.num_kv_heads, self.device),
        )

    def _forward(self, batch: int, draw: bool = False, filtered: bool = False) -> torch.Tensor:
        """What a replay runs: the input gathers, the forward, the logits and their argmax
        (`draw`: or, where a row's temperature is above zero, its draw; `filtered`: with the
        rows' top_k, top_p and min_p)."""
        ids = self._staged[: 2 * self.width].index_select(0, self.source[:batch])
        torch.index_select(self.table, 0, self.rows[:batch], out=self.block_tables[:batch])
        ctx = AttentionContext(self.backend, self.kv_caches, self._metadata(batch), self.kv_scales)
        logits = self.model.compute_logits(self.model(ids, self.positions[:batch], ctx))
        tokens = self.tokens[:batch]
        (argmax if self.device.type == "cuda" else argmax_ref)(logits, out=tokens)
        if draw:
            temperature = self.temperature[:batch]
            filters = Filters(self.top_k[:batch], self.top_p[:batch], self.min_p[:batch], GRAPH_TOP_K,
                              top_p_without_k=False) if filtered else None
            drawn = draw_in_graph(logits, temperature, self.uniforms[:batch], filters)
            tokens.copy_(torch.where(temperature <= 0.0, tokens, drawn))
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        if self.device.type != "cuda":
            return  # run() calls the forward itself
        self.graphs, self.logits, pool = _capture(self._forward, self.buckets, self.device)
        self.draw_graphs, self.draw_logits, _ = _capture(functools.partial(self._forward, draw=True), self.buckets,
                                                         self.device, pool)
        self.filter_graphs, self.filter_logits, _ = _capture(
            functools.partial(self._forward, draw=True, filtered=True), self.buckets, self.device, pool)
        log.info("captured decode CUDA graphs for batch sizes %s (argmax; argmax or draw, with and without filters)",
                 self.buckets)

    def holds(self, table: torch.Tensor) -> bool:
        """The graphs gather block tables from `table`: the one captured (the persistent
        tables are reallocated only if more sequences are in flight than max_num_seqs, and
        the steps after that run eagerly)."""
        return table is self.table

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def owns(self, tokens: torch.Tensor | None) -> bool:
        """`tokens` is the last replay's argmax (a view of the tokens segment)."""
        return tokens is not None and tokens.data_ptr() == self.tokens.data_ptr()

    def stage(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        rows: list[int],  # each sequence's row of the persistent block tables
        seq_lens: list[int],
        pending_at: list[int],  # rows whose input is the token sampled a step ago ...
        pending_from: list[int],  # ... and that token's row in the last step's tokens
        logits_indices: list[int],
        gather: bool,  # the last step's tokens are not the graph's own: take_tokens follows
        draw: GraphDraw | None = None,  # the rows' temperatures, uniforms and filters (run(draw=True))
    ) -> None:
        """Write one step's inputs behind the tokens segment with one host-to-device copy."""
        n, batch, width = len(rows), self.bucket(len(rows)), self.width
        h = self._host.next()
        seg = h[: len(_SEGMENTS) * width].reshape(len(_SEGMENTS), width)
        for i, values in enumerate((input_ids, positions, slots, rows), start=1):
            seg[i, : len(values)] = values
        seg[1:5, n:batch] = 0  # token 0 at position 0 of table row 0 (the pinned buffer holds old steps) ...
        seg[3, n:batch] = -1  # ... whose slot is -1
        seg[5, :batch] = self._own_ids[:batch]  # each row its own input id ...
        # (every row pending, the usual async decode step: a slice, not a scatter)
        at = slice(0, n) if len(pending_at) == n else pending_at
        if gather:  # ... or a pending token: the last step's, gathered into the tokens segment
            seg[5, at] = pending_at
            seg[6, :n] = 0
            seg[6, at] = pending_from
        else:  # ... or the graph's token from a step ago
            seg[5, at] = pending_from
        seg[7, : len(logits_indices)] = logits_indices
        lens = h[len(_SEGMENTS) * width: len(_SEGMENTS) * width + width // 2].view(np.int32)
        lens[:n] = seq_lens
        lens[n:batch] = 1
        if draw is not None:
            floats = h[len(_SEGMENTS) * width + width // 2:].view(np.float32)
            temperature, uniforms, top_p, min_p = floats.reshape(4, width)
            temperature[:n], uniforms[:n] = draw.temperature, draw.uniforms
            temperature[n:batch] = 0.0  # padding rows: argmax
            if draw.filtered:  # padding rows filter nothing (the pinned buffer holds old steps)
                seg[8, :n], top_p[:n], min_p[:n] = draw.top_k, draw.top_p, draw.min_p
                seg[8, n:batch], top_p[n:batch], min_p[n:batch] = 0, 1.0, 0.0
        self._host.upload(width)

    def take_tokens(self, tokens: torch.Tensor, n: int) -> None:
        """Gather the pending rows' tokens of the last step (not a replay's) into the tokens
        segment, where the staged sources point (stage(gather=True))."""
        torch.index_select(tokens, 0, self.gather_from[:n], out=self.tokens[:n])

    def run(self, n: int, draw: bool = False, filtered: bool = False) -> torch.Tensor:
        """Replay the smallest graph that fits the n staged rows; returns logits [n, vocab]
        (and leaves their argmax, or with `draw` their tokens, in `tokens[:n]`; `filtered`:
        staged with a GraphDraw whose rows filter)."""
        batch = self.bucket(n)
        if filtered:
            graphs, logits = self.filter_graphs, self.filter_logits
        elif draw:
            graphs, logits = self.draw_graphs, self.draw_logits
        else:
            graphs, logits = self.graphs, self.logits
        if self.device.type == "cuda":
            graphs[batch].replay()
        else:
            logits[batch] = self._forward(batch, draw, filtered)
        return logits[batch][:n]


def prefill_buckets(max_tokens: int) -> list[int]:
    """Token counts of the captured prefill graphs: powers of two from 16 up to max_tokens."""
    sizes, n = [], 16
    while n < max_tokens:
        sizes.append(n)
        n *= 2
    return sizes + [max_tokens] if max_tokens >= 16 else []


class PrefillGraphs:
    """CUDA graphs for a step that is one sequence's prompt chunk and nothing else: a batch-1
    request's first token. Eagerly, such a step is ~300 kernels launched from Python, ~11 ms
    on an H200 for SmolLM2's 30 layers against 0.8 ms of device work; replayed, it is the
    device work. One graph per token bucket (prefill_buckets), with the chunk padded to it:

    one int64 buffer:  argmax | input ids | positions | slots | table row, last index | lens
    graph:  table  = persistent_tables[row]          # one row
            hidden = model(ids, positions, ...)      # prefill attention over the cached context
            logits = lm_head(hidden[last])           # the chunk's last real token
            token  = argmax(logits)

    The padding tokens are token 0 at position 0 with slot -1: the cache write skips them and
    prefill attention, which reads the real chunk length from the staged query offsets, gives
    them no rows (their garbage stays in rows nobody reads). A prefix-cache hit or an earlier
    chunk is the context before `start` (the lengths carry it). On the CPU `run` calls the
    same forward eagerly, as DecodeGraphs does.
    """

    def __init__(self, model: nn.Module, backend: AttentionBackend, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 max_tokens: int, table: torch.Tensor, device: torch.device,
                 kv_scales: list[tuple[float, float]] | None = None) -> None:
        self.model, self.backend, self.kv_caches, self.device, self.table = model, backend, kv_caches, device, table
        self.kv_scales = kv_scales
        self.buckets = prefill_buckets(max_tokens)
        self.max_tokens = self.buckets[-1] if self.buckets else 0
        n = self.width = self.max_tokens + self.max_tokens % 2
        # Segments of even length, so that each starts 16-byte aligned (Triton specialises on it):
        # argmax (2) | ids, positions, slots (n each) | row, last | query start 0, T and length (int32)
        self._staged = torch.zeros(2 + 3 * n + 2 + 2, dtype=torch.long, device=device)
        self.tokens = self._staged[:1]
        self.input_ids, self.positions, self.slots = self._staged[2: 2 + 3 * n].view(3, n)
        self.row, self.last = self._staged[2 + 3 * n: 4 + 3 * n].split(1)
        lens = self._staged[4 + 3 * n:].view(torch.int32)
        self.query_start, self.seq_len = lens[:2], lens[2:3]
        self.block_tables = torch.zeros(1, table.shape[1], dtype=torch.int32, device=device)
        self._empty_i32 = torch.zeros(0, dtype=torch.int32, device=device)
        self._host = _PinnedStaging(self._staged)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def _forward(self, bucket: int) -> torch.Tensor:
        torch.index_select(self.table, 0, self.row, out=self.block_tables)
        meta = AttentionMetadata(
            slot_mapping=self.slots[:bucket],
            num_decode_tokens=0,
            decode_block_tables=self._empty_i32.view(0, 0),
            decode_seq_lens=self._empty_i32,
            prefill_block_tables=self.block_tables,
            prefill_query_start_loc=self.query_start,
            prefill_seq_lens=self.seq_len,
            prefill_max_query_len=bucket,
        )
        hidden = self.model(self.input_ids[:bucket], self.positions[:bucket],
                            AttentionContext(self.backend, self.kv_caches, meta, self.kv_scales))
        logits = self.model.compute_logits(hidden.index_select(0, self.last))
        (argmax if self.device.type == "cuda" else argmax_ref)(logits, out=self.tokens)
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        if self.device.type != "cuda":
            return
        self.stage_capture_inputs()
        self.graphs, self.logits, _ = _capture(self._forward, self.buckets, self.device)
        log.info("captured prefill CUDA graphs for chunks of up to %s tokens", self.buckets)

    def stage_capture_inputs(self) -> None:
        """One token, and every row past it in the largest bucket (captured first) token 0 at
        position 0, slot -1: the captures write nothing to the cache and index nothing out
        of range, whatever the pinned buffers held before (stage pads only the chunk's
        own bucket)."""
        self.stage([0], 0, np.array([-1]), 0)
        self.input_ids.zero_()
        self.positions.zero_()
        self.slots.fill_(-1)

    def fits(self, num_tokens: int) -> bool:
        return 1 < num_tokens <= self.max_tokens

    def holds(self, table: torch.Tensor) -> bool:
        """As DecodeGraphs.holds."""
        return table is self.table

    def owns(self, tokens: torch.Tensor | None) -> bool:
        return tokens is not None and tokens.data_ptr() == self.tokens.data_ptr()

    def stage(self, token_ids: list[int], start: int, slots: np.ndarray, row: int) -> None:
        """Write one chunk's inputs (tokens from position `start`, their slots, the sequence's
        row of the persistent block tables) with one host-to-device copy; the rest of the
        bucket is padding."""
        n, width = len(token_ids), self.width
        bucket = next(b for b in self.buckets if b >= n)
        h = self._host.next()
        ids, positions, slot = h[2: 2 + 3 * width].reshape(3, width)
        ids[:n], ids[n:bucket] = token_ids, 0
        positions[:n], positions[n:bucket] = np.arange(start, start + n), 0
        slot[:n], slot[n:bucket] = slots, -1
        h[2 + 3 * width: 4 + 3 * width] = row, n - 1
        h[4 + 3 * width:].view(np.int32)[:3] = 0, n, start + n
        self._host.upload(2)

    def run(self, n: int) -> torch.Tensor:
        """Replay the graph of the smallest bucket that holds the staged n tokens; returns the
        last token's logits [1, vocab] (and leaves their argmax in `tokens`)."""
        bucket = next(b for b in self.buckets if b >= n)
        if self.device.type == "cuda":
            self.graphs[bucket].replay()
        else:
            self.logits[bucket] = self._forward(bucket)
        return self.logits[bucket]
