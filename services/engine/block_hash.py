"""Block hashes: the one function the router and every worker use to name a block of KV.

Torch-free on purpose: the router imports it without any model code.

    hash(block i) = xxh64(seed=HASH_SEED,
                          parent hash | token ids of block i (int32 LE) | extra keys)

The parent link makes a hash name the whole prefix up to and including its block, so equal
hashes mean equal KV. The seed is fixed (never per-process random), so every process and pod
agrees on every hash and a shared index stays valid. Only full blocks are hashed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import xxhash

# Bump whenever the byte layout below changes; workers and routers refuse to mix versions.
HASH_SCHEME_VERSION = 1
HASH_SEED = 0x70647365  # b"pdse"

_ROOT = b"\x00"  # first block of a sequence: no parent
_CHILD = b"\x01"


def hash_block(
    parent: int | None, token_ids: Sequence[int], extra_keys: Sequence[str | int] = ()
) -> int:
    """Hash of one full block, chained to its parent block's hash (None for the first block)."""
    h = xxhash.xxh64(seed=HASH_SEED)
    h.update(_ROOT if parent is None else _CHILD + parent.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    for key in extra_keys:
        raw = key.encode() if isinstance(key, str) else key.to_bytes(8, "little", signed=True)
        h.update(len(raw).to_bytes(4, "little") + raw)
    return h.intdigest()


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    *,
    parent: int | None = None,
    start_block: int = 0,
    first_block_keys: Sequence[str | int] = (),
) -> list[int]:
    """Hashes of the full blocks of `token_ids` from `start_block` on, chained from `parent`.

    `first_block_keys` (e.g. a cache salt) are mixed into block 0 only; through the chain
    they then change every later hash too.
    """
    hashes: list[int] = []
    for i in range(start_block, len(token_ids) // block_size):
        keys = first_block_keys if i == 0 else ()
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], keys)
        hashes.append(parent)
    return hashes
