"""Token embedding whose table may be quantized (a GGUF model's token_embd, kept as stored)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.layers import linear
from services.engine.quant import QuantizedWeight


class Embedding(nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings, embedding_dim, device="meta" if linear._deferred else None)
        self.out_dtype = torch.get_default_dtype()  # the model's dtype, for dequantized rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, QuantizedWeight):
            return self.weight.take_rows(ids, self.out_dtype)
        return F.embedding(ids, self.weight)
