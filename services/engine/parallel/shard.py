"""Which part of the model each tensor-parallel rank holds, and the checkpoint slices that fill it.

    query heads   H / N per rank, contiguous: rank r holds heads [r*H/N, (r+1)*H/N)
    KV heads      KVH / N per rank when N divides KVH; when KVH < N (N a multiple of KVH),
                  one head each, rank r holding head r // (N / KVH) (replicated)
    MLP           intermediate / N columns of gate and up, the same rows of down
    vocabulary    ceil(V / N) rows per rank, the last padded with zeros

Shapes that do not divide are refused at start-up (`check`), as vLLM does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from services.engine.errors import ConfigError
from services.engine.models.config import ModelConfig

if TYPE_CHECKING:
    from services.engine.parallel.pipe import Pipe


@dataclass(frozen=True)
class Shard:
    rank: int
    size: int

    def check(self, cfg: ModelConfig) -> None:
        n, h, kvh = self.size, cfg.num_heads, cfg.num_kv_heads
        if h % n:
            raise ConfigError(f"tensor_parallel_size {n} does not divide the model's {h} attention heads")
        if (kvh >= n and kvh % n) or (kvh < n and n % kvh):
            raise ConfigError(f"tensor_parallel_size {n} and the model's {kvh} KV heads: one must divide the other")
        if cfg.intermediate_size % n:
            raise ConfigError(f"tensor_parallel_size {n} does not divide the MLP's {cfg.intermediate_size} columns")

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """`cfg` with this rank's head and MLP counts (hidden size and vocabulary stay whole)."""
        self.check(cfg)
        return replace(cfg, num_heads=cfg.num_heads // self.size, num_kv_heads=max(cfg.num_kv_heads // self.size, 1),
                       intermediate_size=cfg.intermediate_size // self.size)

    def kv_heads(self, cfg: ModelConfig) -> range:
        """The (global) KV heads this rank holds."""
        kvh, n = cfg.num_kv_heads, self.size
        if kvh >= n:
            per = kvh // n
            return range(self.rank * per, (self.rank + 1) * per)
        head = self.rank // (n // kvh)
        return range(head, head + 1)

    def kv_owners(self, cfg: ModelConfig) -> list[int]:
        """One rank per distinct KV shard, in head order: their shards side by side are all heads."""
        return list(range(0, self.size, max(self.size // cfg.num_kv_heads, 1)))

    def vocab_rows(self, vocab_size: int) -> int:
        return -(-vocab_size // self.size)

    # ---- checkpoint slices -------------------------------------------------------------------

    def rows(self, t: torch.Tensor, per: int) -> torch.Tensor:
        """This rank's `per` leading-dimension entries of a column-parallel weight (or its bias)."""
        return t.narrow(0, self.rank * per, per)

    def cols(self, t: torch.Tensor, per: int) -> torch.Tensor:
        """This rank's `per` input columns of a row-parallel weight."""
        return t.narrow(1, self.rank * per, per)

    def heads(self, t: torch.Tensor, heads: range, head_dim: int) -> torch.Tensor:
        return t.narrow(0, heads.start * head_dim, len(heads) * head_dim)

    def vocab(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of an embedding or LM head, zero-padded to `vocab_rows`."""
        per = self.vocab_rows(t.shape[0])
        part = t[self.rank * per : (self.rank + 1) * per]
        if part.shape[0] < per:
            part = torch.cat([part, part.new_zeros(per - part.shape[0], *t.shape[1:])])
        return part

    def q_heads(self, cfg: ModelConfig) -> range:
        per = cfg.num_heads // self.size
        return range(self.rank * per, (self.rank + 1) * per)


def local_config(cfg: ModelConfig, shard: Shard | None, pipe: Pipe | None) -> ModelConfig:
    """`cfg` as one rank holds it: its heads and MLP columns (`shard`), its stage's layers (`pipe`)."""
    local = shard.local_config(cfg) if shard is not None else cfg
    return replace(local, num_layers=len(pipe.layers(cfg.num_layers))) if pipe is not None else local
