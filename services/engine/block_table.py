"""The model runner's persistent copy of the block tables, one row per scheduled sequence.

Rebuilding a [batch, max_blocks] tensor from Python lists every step costs O(batch x blocks)
on the host (about a millisecond at batch 256). A sequence's table only grows by one block
every `block_size` decode steps, so this keeps a row per sequence in a host buffer (pinned on
CUDA), writes only what changed, mirrors it to the device with one copy, and lets a step
pick its rows with an index instead:

    host/device rows   r0: [ 7  3 12  .  . ]   <- seq 41
                       r1: [ 5  .  .  .  . ]   <- seq 42
                       r2: [ 9  2  .  .  . ]   <- seq 40 (finished: row free for reuse)
    a step's tables  = device.index_select(0, [r1, r0])

What may change in a table between two steps: blocks appended at the end, and the last block
replaced (copy-on-write of a shared partial block). A table that is a different list object
(the sequence was preempted and reallocated, or forked from a parent) is rewritten whole.
The scheduler reports finished and preempted sequences in `StepPlan.released_seq_ids`.

Entries past a sequence's length are stale but valid block ids; kernels mask them by length.
The host buffer is pinned, so its copy to the device is truly asynchronous: with async
scheduling the next step's rows are written while the previous step may still be queued, so
the first write after an upload waits for its copy to finish (an event; the copy is at the
head of its step, so this rarely waits at all). A step that changes no table uploads nothing.
"""

from __future__ import annotations

import numpy as np
import torch


_CLEAN = (1 << 62, 0)


class BlockTableRows:
    def __init__(self, max_rows: int, max_blocks: int, device: torch.device) -> None:
        self.max_blocks = max_blocks
        self.device = device
        self._alloc(max_rows)
        self._rows: dict[int, int] = {}  # seq_id -> row
        self._free: list[int] = list(range(max_rows - 1, -1, -1))
        self._lists: list[list[int] | None] = [None] * max_rows  # the table each row last mirrored
        self._synced: list[int] = [0] * max_rows  # entries mirrored from that table
        self._tail: list[int] = [0] * max_rows  # and the last of them (a copy-on-write replaces it)
        self._dirty = _CLEAN  # (first, last + 1) of the rows written since the last upload
        self._uploaded: torch.cuda.Event | None = None  # the last upload's copy

    def _alloc(self, rows: int) -> None:
        pin = self.device.type == "cuda"
        self.host = torch.zeros(rows, self.max_blocks, dtype=torch.int32, pin_memory=pin)
        self.host_np = self.host.numpy()
        self.device_table = self.host.to(self.device) if pin else self.host

    def release(self, seq_ids) -> None:
        for seq_id in seq_ids:
            row = self._rows.pop(seq_id, None)
            if row is not None:
                self._lists[row] = None
                self._free.append(row)

    def row(self, seq_id: int, table: list[int]) -> int:
        """The row holding `table` (the sequence's current block table), updated."""
        row = self._rows.get(seq_id)
        if row is None:
            row = self._rows[seq_id] = self._take()
        n = len(table)
        if self._lists[row] is table and n == self._synced[row] and (not n or table[-1] == self._tail[row]):
            return row  # most decode steps: nothing appended or copied-on-write since the last mirror
        if self._lists[row] is not table:
            self._write(row, 0, table)
            self._lists[row] = table
        else:
            start = max(0, self._synced[row] - 1)  # the last block may have been copied-on-write
            if n - start == 1:
                if self.host_np[row, start] != table[start]:
                    self._write(row, start, table[start:])
            elif n > start:
                self._write(row, start, table[start:n])
        self._synced[row] = n
        if n:
            self._tail[row] = table[-1]
        return row

    def _write(self, row: int, start: int, blocks: list[int]) -> None:
        if self._uploaded is not None:  # the host buffer may still be in flight to the device
            self._uploaded.synchronize()
            self._uploaded = None
        self.host_np[row, start : start + len(blocks)] = blocks
        self._dirty = (min(self._dirty[0], row), max(self._dirty[1], row + 1))

    def upload(self) -> torch.Tensor:
        """The device table, current with every row written since the last upload: one copy
        of the rows from the first to the last written, or none (a decoding sequence's table
        grows once every block_size steps)."""
        lo, hi = self._dirty
        if lo < hi and self.device_table is not self.host:
            self.device_table[lo:hi].copy_(self.host[lo:hi], non_blocking=True)
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()
        self._dirty = _CLEAN
        return self.device_table

    def gather(self, rows: list[int]) -> torch.Tensor:
        """[len(rows), max_blocks] int32 on the device: the tables of these rows, in order."""
        table = self.upload()
        index = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        return table.index_select(0, index)

    def _take(self) -> int:
        if not self._free:  # more sequences in flight than expected: grow
            old_rows = self.host.shape[0]
            old = self.host.clone()
            self._alloc(2 * old_rows)
            self.host[:old_rows] = old
            self.device_table.copy_(self.host)
            self._lists += [None] * old_rows
            self._synced += [0] * old_rows
            self._tail += [0] * old_rows
            self._free = list(range(2 * old_rows - 1, old_rows - 1, -1))
        return self._free.pop()

    def slots(self, row: int, start: int, count: int, block_size: int) -> np.ndarray:
        """Cache slots of positions start .. start+count-1 of the sequence in `row`."""
        pos = np.arange(start, start + count, dtype=np.int64)
        return self.host_np[row, pos // block_size].astype(np.int64) * block_size + pos % block_size
