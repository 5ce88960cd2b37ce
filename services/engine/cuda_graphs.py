"""CUDA graphs for decode steps: one captured forward (+ logits) per batch-size bucket.

A decode step launches a few hundred small kernels; from Python each costs ~10 us, far more
than the GPU work of a small batch. Capturing the whole forward once per bucket and replaying
it makes a step one launch. The graph reads its inputs from static buffers, so a step copies
its token ids, positions, slots, block tables and lengths into them and replays the graph of
the smallest bucket that fits; the rows past the real batch are padding (slot -1: nothing is
written to the cache; length 1: a harmless read of block 0).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from services.engine.attention import AttentionBackend, AttentionContext, AttentionMetadata

log = logging.getLogger("pdserve.engine")


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
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
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

    def run(
        self,
        input_ids: torch.Tensor,  # [n] int64, device
        positions: torch.Tensor,
        slots: torch.Tensor,
        table: torch.Tensor,  # [rows, max_blocks] int32, device: the persistent block tables
        rows: torch.Tensor,  # [n] int64, device: each sequence's row of `table`
        seq_lens: torch.Tensor,  # [n] int32, device
    ) -> torch.Tensor:
        """Replay the smallest graph that fits n rows; returns logits [n, vocab]."""
        n = rows.shape[0]
        batch = next(b for b in self.buckets if b >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(slots)
        self.slots[n:batch].fill_(-1)
        self.seq_lens[:n].copy_(seq_lens)
        self.seq_lens[n:batch].fill_(1)
        torch.index_select(table, 0, rows, out=self.block_tables[:n])
        self.graphs[batch].replay()
        return self.logits[batch][:n]
