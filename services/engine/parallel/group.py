"""The ranks of one parallel engine (tensor x pipeline) and their collectives.

Ranks meet through a FileStore in a directory only rank 0's user can read (no listening
socket for the rendezvous), and gloo's sockets bind the loopback address, so only this
worker's own ranks can join. Every collective has a timeout: a rank that dies or hangs makes
the others' collectives fail instead of waiting forever. gloo on the CPU, NCCL on GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # longer than any one layer's compute between two collectives
LOOPBACK = "127.0.0.1"


@dataclass
class Group:
    """This process's rank among `size`, and the backend that joins them (no global state:
    torch.distributed's default group is left alone)."""

    rank: int
    size: int
    backend: dist.ProcessGroup
    device: torch.device  # where this rank's tensors (and so the collectives' buffers) live

    @classmethod
    def join(cls, store: dist.Store, rank: int, size: int, device: torch.device,
             timeout: timedelta = COLLECTIVE_TIMEOUT) -> Group:
        """Blocks until all `size` ranks have joined through `store` (or `timeout` passes)."""
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            backend = dist.ProcessGroupNCCL(store, rank, size, opts)
        else:
            opts = dist.ProcessGroupGloo._Options()
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=LOOPBACK)]
            opts._timeout = timeout
            backend = dist.ProcessGroupGloo(store, rank, size, opts)
        return cls(rank, size, backend, device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place."""
        self.backend.allreduce([t]).wait()
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `t` (same shape on every rank), in rank order."""
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.size)]
        self.backend.allgather([out], [t]).wait()
        return out

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """`t` becomes rank `src`'s, in place (contiguous tensors only)."""
        self.backend.broadcast(t, src).wait()
        return t

    def send(self, t: torch.Tensor, dst: int) -> None:
        self.backend.send([t.contiguous()], dst, 0).wait()

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        self.backend.recv([t], src, 0).wait()
        return t


@dataclass(frozen=True)
class Layout:
    """Where a rank sits: world rank = stage * tp + tp_rank. Rank 0 (stage 0, TP rank 0) is the
    engine core."""

    tp: int
    pp: int
    rank: int

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp


@dataclass
class Ranks:
    """This rank's groups: every rank (plans, KV blocks, activations between stages), and its
    stage's tensor-parallel ranks (the model's all-reduces and all-gathers; None when tp = 1)."""

    layout: Layout
    world: Group
    tp: Group | None

    @classmethod
    def join(cls, store_path: str, layout: Layout, device: torch.device,
             timeout: timedelta = COLLECTIVE_TIMEOUT) -> Ranks:
        store = dist.FileStore(store_path, layout.tp * layout.pp)
        store.set_timeout(timeout)
        world = Group.join(dist.PrefixStore("world", store), layout.rank, layout.tp * layout.pp, device, timeout)
        tp = None
        if layout.tp > 1:
            tp = Group.join(dist.PrefixStore(f"tp{layout.stage}", store), layout.tp_rank, layout.tp, device, timeout)
        return cls(layout, world, tp)
