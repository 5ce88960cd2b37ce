"""CUDA graphs for decode steps: one captured forward (+ logits) per batch-size bucket.

A decode step launches a few hundred small kernels; from Python each costs ~10 us, far more
than the GPU work of a small batch. Capturing the whole forward once per bucket and replaying
it makes a step one launch. The graph reads its inputs from static buffers: a step stages its
token ids, positions, slots, table rows and lengths into them with one host-to-device copy
(`stage`), gathers its block tables by row, and replays the graph of the smallest bucket
that fits; the rows past the real batch are padding (slot -1: nothing is written to the
cache; length 1: a harmless read of a valid block). At batch 1 the host's torch calls are
what a step costs once the GPU's part is ~0.5 ms, so they are kept to five: the staging
buffer and its copy, the pending tokens, the block-table gather and the replay.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from torch import nn

from services.engine.attention import AttentionBackend, AttentionContext, AttentionMetadata

log = logging.getLogger("pdserve.engine")

_SEGMENTS = ("input_ids", "positions", "slots", "rows", "pending_at", "pending_from", "logits_indices")


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
        max_blocks_per_seq: int,
        num_kv_heads: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.device = device
        self.buckets = buckets_up_to(max_batch)
        self.max_batch = self.buckets[-1]
        self.num_kv_heads = num_kv_heads
        n = self.max_batch + self.max_batch % 2
        # Every per-step input in one int64 buffer, so that a step stages them all with one
        # copy (`stage`): ids | positions | slots | table rows | pending at | pending from |
        # logits rows, each n long, then the lengths as int32 pairs.
        self._staged = torch.zeros(len(_SEGMENTS) * n + n // 2, dtype=torch.long, device=device)
        (self.input_ids, self.positions, self.slots, self.rows, self.pending_at, self.pending_from,
         self.logits_indices) = self._staged[: len(_SEGMENTS) * n].view(len(_SEGMENTS), n)
        self.seq_lens = self._staged[len(_SEGMENTS) * n:].view(torch.int32)
        self.slots.fill_(-1)
        self.seq_lens.fill_(1)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._empty_i32 = torch.zeros(0, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

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
        ctx = AttentionContext(self.backend, self.kv_caches, self._metadata(batch))
        hidden = self.model(self.input_ids[:batch], self.positions[:batch], ctx)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
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

    def fits(self, batch: int) -> bool:
        return 0 < batch <= self.max_batch

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def stage(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        rows: list[int],  # each sequence's row of the persistent block tables
        seq_lens: list[int],
        pending_at: list[int],
        pending_from: list[int],
        logits_indices: list[int],
    ) -> None:
        """Write one step's inputs into the graph's buffers with one host-to-device copy; the
        rows past n up to the bucket are padding (token 0 at position 0, slot -1: nothing is
        written to the cache; length 1 and table row 0: a harmless read of a valid block).
        The host side is pinned memory from torch's caching allocator, not reused before its
        copy is done."""
        n, batch = len(rows), self.bucket(len(rows))
        host = torch.empty(self._staged.shape, dtype=torch.long, pin_memory=True)
        h = host.numpy()
        width = self.input_ids.shape[0]
        seg = h[: len(_SEGMENTS) * width].reshape(len(_SEGMENTS), width)
        for i, values in enumerate((input_ids, positions, slots, rows, pending_at, pending_from, logits_indices)):
            seg[i, : len(values)] = values
        seg[:, n:batch] = 0  # token 0 at position 0 of table row 0 (the pinned buffer is uninitialised) ...
        seg[2, n:batch] = -1  # ... whose slot is -1
        lens = h[len(_SEGMENTS) * width:].view(np.int32)
        lens[:n] = seq_lens
        lens[n:batch] = 1
        self._staged.copy_(host, non_blocking=True)

    def run(self, n: int, table: torch.Tensor) -> torch.Tensor:
        """Replay the smallest graph that fits the n staged rows, gathering their block tables
        from `table` ([rows, max_blocks] int32, the persistent tables) first; returns logits
        [n, vocab]."""
        batch = self.bucket(n)
        torch.index_select(table, 0, self.rows[:batch], out=self.block_tables[:batch])
        self.graphs[batch].replay()
        return self.logits[batch][:n]
