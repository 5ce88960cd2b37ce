"""KV transfer, engine side: what a prefill-only request ships, what a remote-prefilled
request receives. Transports (gRPC today) live in services/kv and never touch engine state.

Two roles, as in vLLM's KV connector:

* export (prefill worker). A request with `KVExport` computes its prompt like any other.
  After every step, the prompt blocks that became computed are copied out of the paged
  cache into host memory and handed out with the request's output; when the first tokens
  are sampled, the partial last block follows and the request ends ("prefilled").
  Blocks below `skip_blocks` (the decode worker has them) are never shipped.
  Layer-wise (`EngineCore.kv_layer_sink` set; bytes only): the blocks a step will complete
  are named before it runs, and each of their layers is read out and handed out as soon as
  the forward has written it (`BlockData.layer_start`), so the transfer overlaps the rest
  of the forward. Such a step runs eager: a captured CUDA graph cannot stop between layers.
  `by_reference` (a decode worker on the same GPU maps this worker's pool): blocks are handed
  out as `BlockRef`s naming their slot instead of copies. A slot is held from the moment it
  is named until `release_kv`, whatever happens to the request meanwhile (it ends, is aborted,
  or is preempted and recomputed into other slots), so it cannot be reused while the peer may
  still be copying it.

* import (decode worker). A request with `KVImport` is admitted with blocks for its whole
  prompt at once (after its own prefix-cache hits) and then waits, computing nothing. Each
  received block is checked against what was allocated (index in range, not seen before,
  token count, chained hash of full blocks) and written into its slot. When every block and
  the first tokens have arrived, the sequence continues decoding as if it had prefilled
  itself. If the transfer fails, the sequence prefills the rest locally.

    prompt blocks   [ 0 ][ 1 ][ 2 ][ 3 ][ 4 partial ]
    decode's hits   [ 0 ][ 1 ]                          num_cached_blocks = 2 = skip_blocks
    shipped                   [ 2 ][ 3 ][ 4 partial ]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


class KVTransferError(ValueError):
    """A received block does not fit the request it claims to belong to."""


@dataclass(frozen=True)
class BlockData:
    """One block of a prompt's KV on the host."""

    block_index: int  # position of the block in the prompt
    block_hash: int | None  # None for the partial last block
    tensor: torch.Tensor  # [layers, 2 (K, V), num_tokens, kv_heads, head_dim]
    scales: torch.Tensor | None = None  # an fp8 block's per-layer (K, V) scales, [layers, 2] float32
    layer_start: int = 0  # a layer-wise piece: `tensor` (and `scales`) hold the layers from here on

    @property
    def num_tokens(self) -> int:
        return self.tensor.shape[2]

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


@dataclass(frozen=True)
class BlockRef:
    """One block of a prompt's KV left in this worker's pool, shipped by reference."""

    block_index: int
    block_hash: int | None
    num_tokens: int
    pool_block: int  # its slot in the pool; held until the peer has copied it (release_kv)
    scales: torch.Tensor | None = None  # the pool's per-layer (K, V) scales when it is fp8 (BlockData.scales)


@dataclass
class KVExport:
    skip_blocks: int = 0
    next_block: int = 0  # first block not yet shipped
    by_reference: bool = False
    ready: list[BlockData | BlockRef] = field(default_factory=list)  # read out, not yet handed out


@dataclass(frozen=True)
class LayerwiseBlock:
    """A block a step completes, shipped layer by layer as the forward writes it."""

    block_index: int
    block_hash: int | None
    slot: int  # its block in the paged cache
    num_tokens: int


@dataclass
class KVImport:
    state: str = "pending"  # pending -> waiting (blocks allocated) -> done | failed
    num_cached_blocks: int = 0  # decode's own prefix hits when it allocated
    num_prompt_blocks: int = 0
    received: set[int] = field(default_factory=set)
    bytes_received: int = 0
    prefill_cached_tokens: int = 0
    computed_locally: int = 0  # prompt tokens this worker computed after all (fallback)
    allocated_at: float = 0.0
    completed_at: float | None = None
    failure: str | None = None
    announced: bool = False  # the "start pulling" output has been handed out

    @property
    def num_expected_blocks(self) -> int:
        return self.num_prompt_blocks - self.num_cached_blocks

    @property
    def complete(self) -> bool:
        return len(self.received) == self.num_expected_blocks

    def contiguous_received_blocks(self) -> int:
        """Leading blocks that are present (own hits, then received without a gap)."""
        n = self.num_cached_blocks
        while n in self.received:
            n += 1
        return n

    def mark_allocated(self, num_cached_blocks: int, num_prompt_blocks: int) -> None:
        self.state = "waiting"
        self.num_cached_blocks = num_cached_blocks
        self.num_prompt_blocks = num_prompt_blocks
        self.allocated_at = time.monotonic()


def check_block(imp: KVImport, block: BlockData, num_prompt_tokens: int, block_size: int,
                expected_hash: int | None) -> None:
    """Validate a received block against the request's allocation; raise KVTransferError."""
    i = block.block_index
    if imp.state != "waiting":
        raise KVTransferError(f"block {i} arrived while the transfer is {imp.state}")
    if not imp.num_cached_blocks <= i < imp.num_prompt_blocks:
        raise KVTransferError(f"block index {i} outside [{imp.num_cached_blocks}, {imp.num_prompt_blocks})")
    if i in imp.received:
        raise KVTransferError(f"block {i} received twice")
    want_tokens = min(block_size, num_prompt_tokens - i * block_size)
    if block.num_tokens != want_tokens:
        raise KVTransferError(f"block {i} holds {block.num_tokens} tokens, expected {want_tokens}")
    if expected_hash is not None and block.block_hash != expected_hash:
        raise KVTransferError(f"block {i} hash does not match this request's tokens")
