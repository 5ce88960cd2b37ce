"""Paged KV bookkeeping: which block holds which tokens, who shares it, what stays cached.

The KV pool is `num_blocks` fixed-size blocks. A sequence's block table maps its token
positions to blocks (block_size 4 here):

    tokens       t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 .  .
    block table      [7]     |     [3]     |    [12]       <- partial last block
    block hashes     h0      |  h1(h0,..)  |   (none: only full blocks are hashed)

Sharing is by reference count: forked sequences (n > 1) and prefix-cache hits point at the
same blocks. Only a sequence's partial last block is ever written, and writing into a shared
one first copies it (copy-on-write; the copy is done by the model runner).

Prefix cache: a full, computed block is registered under its chained hash. When its last
user leaves (ref_count 0) it stays registered, in the free queue, until an allocation needs
it: allocation takes never-cached blocks first, then evicts cached ones least recently freed
first. A sequence frees its blocks tail first, so a prefix outlives its extensions.

Cache events: an optional listener hears every hash the prefix cache gains (`stored`) and
loses (`evicted`, including `reset_prefix_cache`), in order, on the thread that runs the
engine. Workers use it to mirror their cache into the fleet-wide prefix index; the engine
knows nothing about where the hashes go.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from services.engine.block_hash import hash_blocks
from services.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


class CacheListener(Protocol):
    """Hears the prefix cache change. Called on the engine thread: keep it cheap."""

    def stored(self, block_hash: int) -> None: ...

    def evicted(self, block_hash: int) -> None: ...


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in allocation order: front = next to hand out (or evict).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._listener: CacheListener | None = None
        # Counters for metrics.
        self.num_evictions = 0

    def set_listener(self, listener: CacheListener | None) -> None:
        """Report cache changes to `listener` from now on; it first hears every hash already cached."""
        self._listener = listener
        if listener is not None:
            for block_hash in list(self._cached):
                listener.stored(block_hash)

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they can be evicted on demand)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_block(self, block_hash: int) -> int | None:
        return self._cached.get(block_hash)

    def get_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of `seq`'s tokens (touches nothing).

        The last token is never a hit: its logits are needed, so at least one token is computed.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self.ensure_hashes(seq, max_blocks)
        hits: list[int] = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    # ---- allocation ----------------------------------------------------------------------

    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] | None = None
    ) -> list[tuple[int, int]] | None:
        """Make `seq`'s table cover its computed tokens plus `num_new_tokens` more.

        `cached_blocks` (only for a sequence holding no blocks) are prefix-cache hits to take
        first. Returns the (src, dst) block copies that copy-on-write needs before the step,
        or None, changing nothing, if the free pool is too small.
        """
        table = seq.block_table
        if num_new_tokens == 1 and not cached_blocks:
            # The common decode step: the slot lies inside the last block, which only this
            # sequence holds; nothing to allocate or copy.
            pos = seq.num_computed_tokens
            if pos % self.block_size and pos // self.block_size == len(table) - 1 \
                    and self.blocks[table[-1]].ref_count == 1:
                return []
        cached_blocks = cached_blocks or []
        assert not cached_blocks or not seq.block_table, "cache hits only for a fresh sequence"
        num_computed = seq.num_computed_tokens + len(cached_blocks) * self.block_size
        num_needed = self.num_blocks_for(num_computed + num_new_tokens)
        num_fresh = max(0, num_needed - len(table) - len(cached_blocks))

        write_idx = num_computed // self.block_size
        cow = (
            num_computed % self.block_size != 0
            and write_idx < len(table)
            and self.blocks[table[write_idx]].ref_count > 1
        )
        num_revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if num_fresh + int(cow) + num_revived > len(self._free):
            return None

        for block_id in cached_blocks:
            self._take(block_id)
            table.append(block_id)
        if cached_blocks:
            seq.num_cached_blocks = len(cached_blocks)
        copies: list[tuple[int, int]] = []
        if cow:
            src = table[write_idx]
            dst = self._pop_free()
            self.blocks[src].ref_count -= 1
            table[write_idx] = dst
            copies.append((src, dst))
        for _ in range(num_fresh):
            table.append(self._pop_free())
        return copies

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Free the blocks of `seq` past its first `num_tokens` tokens (the slots of rejected
        speculative drafts: never hashed, so never cached)."""
        keep = self.num_blocks_for(num_tokens)
        if len(seq.block_table) > keep:
            self.release(seq.block_table[keep:])
            del seq.block_table[keep:]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` share every block of `parent` (n > 1 sequences share the prompt's KV)."""
        assert not child.block_table
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_cached_blocks = parent.num_cached_blocks

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq`; cached ones stay reusable until evicted."""
        self.release(seq.block_table)
        seq.block_table = []
        seq.num_cached_blocks = 0

    def hold(self, block_ids: list[int]) -> None:
        """One more reference on each block: they stay allocated, whoever else frees them,
        until `release` (KV shipped by reference, while the peer copies it)."""
        for block_id in block_ids:
            assert self.blocks[block_id].ref_count > 0, f"block {block_id} is free: nothing to hold"
            self._take(block_id)

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference on each block (a table's, or a hold's); unreferenced blocks go
        back to the free queue, uncached ones first in line."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register `seq`'s newly full, computed blocks in the prefix cache."""
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_cached_blocks or not self.enable_prefix_caching:
            return
        self.ensure_hashes(seq, num_full)
        for i in range(seq.num_cached_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            block_hash = seq.block_hashes[i]
            # A block already cached under this hash elsewhere stays unregistered: one copy is enough.
            if block.block_hash is None and block_hash not in self._cached:
                block.block_hash = block_hash
                self._cached[block_hash] = block.block_id
                if self._listener is not None:
                    self._listener.stored(block_hash)
        seq.num_cached_blocks = num_full

    def reset_prefix_cache(self) -> int:
        """Forget every cached block no sequence holds; returns how many were dropped."""
        dropped = 0
        for block_id in list(self._free):
            if self._uncache(self.blocks[block_id]):
                self._free.move_to_end(block_id, last=False)
                dropped += 1
        return dropped

    # ---- checks --------------------------------------------------------------------------

    def assert_all_free(self) -> None:
        """Accounting check for tests: no block is held, and the cache index is consistent."""
        held = [b.block_id for b in self.blocks if b.ref_count != 0]
        assert not held, f"blocks still held: {held}"
        assert len(self._free) == self.num_blocks, "free queue lost blocks"
        for block_hash, block_id in self._cached.items():
            assert self.blocks[block_id].block_hash == block_hash, f"stale cache entry {block_id}"

    # ---- internals -----------------------------------------------------------------------

    def ensure_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """The chained hashes of `seq`'s first `num_blocks` full blocks (computed once)."""
        have = len(seq.block_hashes)
        if have >= num_blocks:
            return seq.block_hashes[:num_blocks]
        # Only the new blocks' tokens: a decode fills a block every block_size steps, and
        # copying the whole sequence each time would cost O(length) per block.
        bs = self.block_size
        seq.block_hashes.extend(
            hash_blocks(
                seq.token_ids[have * bs : num_blocks * bs],
                bs,
                parent=seq.block_hashes[-1] if have else None,
                first_block_keys=seq.hash_salt if not have else (),
            )
        )
        return seq.block_hashes[:num_blocks]

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if self._uncache(block):
            self.num_evictions += 1
        block.ref_count = 1
        return block_id

    def _uncache(self, block: Block) -> bool:
        if block.block_hash is None:
            return False
        if self._cached.get(block.block_hash) == block.block_id:
            del self._cached[block.block_hash]
            if self._listener is not None:
                self._listener.evicted(block.block_hash)
        block.block_hash = None
        return True
