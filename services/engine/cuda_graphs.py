"""CUDA graphs for decode steps: one captured forward (+ logits) per batch-size bucket.

A decode step launches a few hundred small kernels; from Python each costs ~10 us, far more
than the GPU work of a small batch. Capturing the whole forward once per bucket and replaying
it makes a step one launch. At batch 1 the GPU's part is ~0.5 ms, so the host's own torch
calls are what is left of a step; a step makes three: the staging copy, the replay and (the
sampler's) the copy of its tokens back. Everything else a step needs is inside the graph:

    one int64 buffer:  tokens | input ids | positions | slots | table rows | source | ...
                       ^ the last replay's greedy tokens (argmax, written by the graph)

    graph:  ids    = buffer[:2n][source]        # a pending input: the token sampled a step ago
            tables = persistent_tables[rows]    # block_table.py's device rows
            logits = model(ids, positions, ...)
            tokens = logits.argmax(-1)          # the sampler's, when every row is plain greedy

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

from services.engine.attention import AttentionBackend, AttentionContext, AttentionMetadata

log = logging.getLogger("pdserve.engine")

_SEGMENTS = ("tokens", "input_ids", "positions", "slots", "rows", "source", "gather_from", "logits_indices")


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(batch: int, num_kv_heads: int, device: torch.device) -> tuple[int, int]:
    """Flash-decoding's (most splits, fewest tokens per split) for a decode batch
    (kernels/paged_attention.py; each pair is a compiled kernel variant, fixed per graph).

    While the (sequence, KV head) programs fill the SMs, only long sequences are split, into
    at most 4 ranges of at least 512 tokens: with ragged lengths the longest sequences set a
    step's time. Below that, every sequence is cut into one-tile (64-token) ranges, enough
    programs to fill the GPU twice, rounded up to a power of two. Both from
    loadtest/profile_gpu.py's `splits` sweep on an H200 (BENCHMARKS.md)."""
    if device.type != "cuda" or batch == 0:
        return 1, 64
    programs = batch * num_kv_heads
    if programs >= _num_sms(device):
        return 4, 512
    wanted = -(-2 * _num_sms(device) // programs)
    return min(16, 1 << (wanted - 1).bit_length()), 64


def buckets_up_to(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return sorted({b for b in sizes if b <= max_batch} | {max_batch})


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
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.device = device
        self.table = table
        self.buckets = buckets_up_to(max_batch)
        self.max_batch = self.buckets[-1]
        self.num_kv_heads = num_kv_heads
        n = self.width = self.max_batch + self.max_batch % 2
        # Every per-step value in one int64 buffer, n entries a segment (_SEGMENTS), then the
        # lengths as int32 pairs; `stage` fills all but the tokens with one copy.
        self._staged = torch.zeros(len(_SEGMENTS) * n + n // 2, dtype=torch.long, device=device)
        (self.tokens, self.input_ids, self.positions, self.slots, self.rows, self.source, self.gather_from,
         self.logits_indices) = self._staged[: len(_SEGMENTS) * n].view(len(_SEGMENTS), n)
        self.seq_lens = self._staged[len(_SEGMENTS) * n:].view(torch.int32)
        self.slots.fill_(-1)
        self.seq_lens.fill_(1)
        self._own_ids = np.arange(n, 2 * n)  # a row's source: its own input id
        self.source.copy_(torch.from_numpy(self._own_ids))
        self.block_tables = torch.zeros(n, table.shape[1], dtype=torch.int32, device=device)
        self._empty_i32 = torch.zeros(0, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        # Two pinned staging buffers, used in turn; each is refilled once its last copy is done.
        pin = device.type == "cuda"
        self._host = [torch.empty(self._staged.shape, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._copied = [torch.cuda.Event() for _ in range(2)] if pin else None
        self._turn = 0

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

    def _forward(self, batch: int) -> torch.Tensor:
        """What a replay runs: the input gathers, the forward, the logits and their argmax."""
        ids = self._staged[: 2 * self.width].index_select(0, self.source[:batch])
        torch.index_select(self.table, 0, self.rows[:batch], out=self.block_tables[:batch])
        ctx = AttentionContext(self.backend, self.kv_caches, self._metadata(batch))
        logits = self.model.compute_logits(self.model(ids, self.positions[:batch], ctx))
        torch.argmax(logits, dim=-1, out=self.tokens[:batch])
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        if self.device.type != "cuda":
            return  # run() calls the forward itself
        pool = None
        for batch in reversed(self.buckets):  # largest first: later graphs reuse its memory pool
            self._forward(batch)  # compile the Triton kernels outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[batch] = self._forward(batch)
            pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def fits(self, batch: int, table: torch.Tensor) -> bool:
        """A graph takes `batch` rows whose block tables live in `table` (the one captured:
        the persistent tables are reallocated only if more sequences are in flight than
        max_num_seqs, and the steps after that run eagerly)."""
        return 0 < batch <= self.max_batch and table is self.table

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
    ) -> None:
        """Write one step's inputs behind the tokens segment with one host-to-device copy."""
        n, batch, width = len(rows), self.bucket(len(rows)), self.width
        turn, self._turn = self._turn, 1 - self._turn
        if self._copied is not None:
            self._copied[turn].synchronize()  # its copy two steps ago: long done
        h = self._host[turn].numpy()
        seg = h[: len(_SEGMENTS) * width].reshape(len(_SEGMENTS), width)
        for i, values in enumerate((input_ids, positions, slots, rows), start=1):
            seg[i, : len(values)] = values
        seg[1:5, n:batch] = 0  # token 0 at position 0 of table row 0 (the pinned buffer holds old steps) ...
        seg[3, n:batch] = -1  # ... whose slot is -1
        seg[5, :batch] = self._own_ids[:batch]  # each row its own input id ...
        if gather:  # ... or a pending token: the last step's, gathered into the tokens segment
            seg[5, pending_at] = pending_at
            seg[6, :n] = 0
            seg[6, pending_at] = pending_from
        else:  # ... or the graph's token from a step ago
            seg[5, pending_at] = pending_from
        seg[7, : len(logits_indices)] = logits_indices
        lens = h[len(_SEGMENTS) * width:].view(np.int32)
        lens[:n] = seq_lens
        lens[n:batch] = 1
        self._staged[width:].copy_(self._host[turn][width:], non_blocking=True)
        if self._copied is not None:
            self._copied[turn].record()

    def take_tokens(self, tokens: torch.Tensor, n: int) -> None:
        """Gather the pending rows' tokens of the last step (not a replay's) into the tokens
        segment, where the staged sources point (stage(gather=True))."""
        torch.index_select(tokens, 0, self.gather_from[:n], out=self.tokens[:n])

    def run(self, n: int) -> torch.Tensor:
        """Replay the smallest graph that fits the n staged rows; returns logits [n, vocab]
        (and leaves their argmax in `tokens[:n]`)."""
        batch = self.bucket(n)
        if self.device.type == "cuda":
            self.graphs[batch].replay()
        else:
            self.logits[batch] = self._forward(batch)
        return self.logits[batch][:n]
