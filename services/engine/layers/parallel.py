"""Tensor-parallel layers (services/engine/parallel/): each is the plain layer when `tp` is None.

A column-parallel linear needs no layer of its own: it is an ordinary Linear over this rank's
output rows (sliced at load, parallel/shard.py). A row-parallel one sums its partial products
over the ranks; the vocabulary-parallel embedding and LM head each hold a slice of the rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.layers.linear import Linear, linear
from services.engine.parallel.group import Group


class RowParallelLinear(Linear):
    """x holds this rank's slice of the input features; y = all-reduce(x @ W_r^T) + bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: Group | None) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabEmbedding(nn.Module):
    """An embedding table of which this rank holds rows [rank*per, (rank+1)*per); a token
    another rank holds embeds to zero here, and the all-reduce adds the rank that holds it."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: Group | None) -> None:
        super().__init__()
        self.tp = tp
        per = vocab_size if tp is None else -(-vocab_size // tp.size)
        self.start = 0 if tp is None else tp.rank * per
        self.weight = nn.Parameter(torch.empty(per, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill_(outside[:, None], 0))


def vocab_logits(hidden: torch.Tensor, head_weight: torch.Tensor, vocab_size: int, tp: Group | None) -> torch.Tensor:
    """(N, hidden) -> (N, vocab_size): each rank's slice of the LM head, gathered on every rank."""
    logits = linear(hidden, head_weight)
    if tp is None:
        return logits
    if hidden.shape[0] == 0:  # the same on every rank, so every rank skips the collective
        return hidden.new_empty(0, vocab_size)
    return torch.cat(tp.all_gather(logits), dim=-1)[:, :vocab_size]
