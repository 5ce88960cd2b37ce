"""A worker's mirror of its own prefix cache, fed by the block manager's listener.

The engine thread records every stored and evicted hash; the publisher (asyncio) drains the
net changes in batches, or takes the whole mirror to resync after a (re)connect. Only the last
change per hash matters (a set is idempotent), so the pending changes are one dict and a
stored-evicted-stored flurry publishes once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Changes:
    added: list[int]
    removed: list[int]
    oldest: float | None  # time.monotonic() of the earliest change in the batch
    resync: bool  # changes were dropped (too many while unpublished): send the whole mirror


class CacheEventLog:
    """Thread-safe: `stored`/`evicted` on the engine thread, `drain`/`snapshot` elsewhere."""

    def __init__(self, max_pending: int = 1 << 16) -> None:
        self._lock = threading.Lock()
        self._held: set[int] = set()
        self._pending: dict[int, bool] = {}  # hash -> held after its last change
        self._oldest: float | None = None
        self._overflowed = False
        self.max_pending = max_pending

    def stored(self, block_hash: int) -> None:
        with self._lock:
            self._held.add(block_hash)
            self._note(block_hash, True)

    def evicted(self, block_hash: int) -> None:
        with self._lock:
            self._held.discard(block_hash)
            self._note(block_hash, False)

    def _note(self, block_hash: int, held: bool) -> None:
        if self._oldest is None:
            self._oldest = time.monotonic()
        self._pending[block_hash] = held
        if len(self._pending) > self.max_pending:  # nobody is publishing (Redis down): resync later
            self._pending.clear()
            self._overflowed = True

    def drain(self) -> Changes:
        """The net changes since the last drain or snapshot."""
        with self._lock:
            pending, oldest, resync = self._pending, self._oldest, self._overflowed
            self._pending, self._oldest, self._overflowed = {}, None, False
        return Changes([h for h, held in pending.items() if held], [h for h, held in pending.items() if not held],
                       oldest, resync)

    def snapshot(self) -> list[int]:
        """Every hash held now; pending changes are folded in (later ones still arrive by drain)."""
        with self._lock:
            self._pending, self._oldest, self._overflowed = {}, None, False
            return list(self._held)

    def __len__(self) -> int:
        return len(self._held)
