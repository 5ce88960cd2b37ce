"""GPT-2: learned absolute positions, pre-LayerNorm blocks, GELU MLP, multi-head attention.

    x = wte(ids) + wpe(positions) -> [LN -> attention -> +res -> LN -> MLP -> +res] x L -> LN -> logits

Reference: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners";
parameter names follow transformers' modeling_gpt2.py. Its Conv1D layers store weights as
(in, out); they are transposed once at load into ordinary Linear layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers.activations import ACT2FN

from services.engine.attention import AttentionContext
from services.engine.layers.linear import Linear, linear
from services.engine.models.config import ModelConfig
from services.engine.models.loading import load_params
from services.engine.quant import QuantizedWeight

_CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.c_attn = Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.c_proj = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, attn: AttentionContext) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = (t.view(T, self.num_heads, self.head_dim) for t in self.c_attn(x).chunk(3, dim=-1))
        out = attn.attend(self.layer, q, k, v, self.scale)  # (T, H, D)
        return self.c_proj(out.reshape(T, -1))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor, attn: AttentionContext) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList([GPT2Block(cfg, i) for i in range(cfg.num_layers)])
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext,
                num_layers: int | None = None) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)  # (T, hidden)
        for block in self.h[:num_layers]:
            x = block(x, attn)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = GPT2Model(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext,
                num_layers: int | None = None) -> torch.Tensor:
        """(T,) token ids and positions -> (T, hidden) final hidden states; `num_layers`: after
        the first layers only, then the final norm (a self-speculative draft, spec/draft.py)."""
        return self.transformer(input_ids, positions, attn, num_layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.transformer.wte if self.config.tie_word_embeddings else self.lm_head
        return linear(hidden, head.weight)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     quantize: Callable[[torch.Tensor], QuantizedWeight] | None = None) -> None:
        def rename(name: str) -> tuple[str, str | None, int]:
            # Bare GPT-2 checkpoints (as on the Hub) lack the "transformer." prefix.
            if not name.startswith(("transformer.", "lm_head.")):
                name = "transformer." + name
            return name, None, 0

        def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
            return tensor.t() if name.endswith(_CONV1D) else tensor

        skip = (".attn.bias", ".attn.masked_bias") + (
            ("lm_head.weight",) if self.config.tie_word_embeddings else ()
        )
        load_params(self, weights, rename, {}, skip, transform, quantize)
