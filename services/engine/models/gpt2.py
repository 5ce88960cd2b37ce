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

from services.engine.attention import AttentionContext
from services.engine.layers.activation import activation
from services.engine.layers.linear import Linear
from services.engine.layers.parallel import RowParallelLinear, VocabEmbedding, vocab_logits
from services.engine.models.config import ModelConfig
from services.engine.models.loading import load_params
from services.engine.parallel.group import Group
from services.engine.parallel.pipe import Pipe
from services.engine.parallel.shard import Shard, local_config
from services.engine.quant import QuantizedWeight

_CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: Group | None) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        heads_size = cfg.num_heads * cfg.head_dim  # the hidden size, or this rank's heads of it
        self.c_attn = Linear(cfg.hidden_size, 3 * heads_size)
        self.c_proj = RowParallelLinear(heads_size, cfg.hidden_size, bias=True, tp=tp)

    def forward(self, x: torch.Tensor, attn: AttentionContext) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = (t.view(T, self.num_heads, self.head_dim) for t in self.c_attn(x).chunk(3, dim=-1))
        out = attn.attend(self.layer, q, k, v, self.scale)  # (T, H, D)
        return self.c_proj(out.reshape(T, -1))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: Group | None) -> None:
        super().__init__()
        self.c_fc = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=True, tp=tp)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: Group | None) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg, layer, tp)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg, tp)

    def forward(self, x: torch.Tensor, attn: AttentionContext) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: Group | None, pipe: Pipe | None) -> None:
        """`cfg.num_layers`: this stage's blocks, numbered from 0 (parallel/pipe.py)."""
        super().__init__()
        self.pipe = pipe
        if pipe is None or pipe.first:
            self.wte = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
            self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
            self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.h = nn.ModuleList([GPT2Block(cfg, i, tp) for i in range(cfg.num_layers)])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext,
                num_layers: int | None = None) -> torch.Tensor:
        """The final hidden states; on a pipeline stage after the first, this stage's output."""
        pipe, ln = self.pipe, self.h[0].ln_1
        first = pipe is None or pipe.first
        x = (self.wte(input_ids) + self.wpe(positions) if first  # (T, hidden)
             else pipe.recv_prev(len(input_ids), ln.normalized_shape[0], ln.weight.dtype))
        for block in self.h[:num_layers]:
            x = block(x, attn)
        if pipe is not None:  # to the next stage; stage 0 gets the last one's output back
            pipe.send_next(x)
            if not first:
                return x
            x = pipe.recv_prev(len(input_ids), ln.normalized_shape[0], ln.weight.dtype)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, tp: Group | None = None,
                 pipe: Pipe | None = None) -> None:
        """`tp`: build this rank's shard (its heads, MLP columns and vocabulary rows); `pipe`:
        only this pipeline stage's blocks (and, on stage 0, the embeddings, ln_f and LM head)."""
        super().__init__()
        self.config, self.tp, self.pipe = cfg, tp, pipe
        self.shard = Shard(tp.rank, tp.size) if tp is not None else None
        self.local = local_config(cfg, self.shard, pipe)
        self.transformer = GPT2Model(self.local, tp, pipe)
        if not cfg.tie_word_embeddings and (pipe is None or pipe.first):
            self.lm_head = Linear(cfg.hidden_size, self.transformer.wte.weight.shape[0], bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext,
                num_layers: int | None = None) -> torch.Tensor:
        """(T,) token ids and positions -> (T, hidden) final hidden states; `num_layers`: after
        the first layers only, then the final norm (a self-speculative draft, spec/draft.py)."""
        return self.transformer(input_ids, positions, attn, num_layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.transformer.wte if self.config.tie_word_embeddings else self.lm_head
        return vocab_logits(hidden, head.weight, self.config.vocab_size, self.tp)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     quantize: Callable[[torch.Tensor], QuantizedWeight] | None = None) -> None:
        def rename(name: str) -> tuple[str, str | None, int]:
            # Bare GPT-2 checkpoints (as on the Hub) lack the "transformer." prefix.
            if not name.startswith(("transformer.", "lm_head.")):
                name = "transformer." + name
            return name, None, 0

        def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.t() if name.endswith(_CONV1D) else tensor
            return self._slice(name, tensor) if self.shard is not None else tensor

        skip = (".attn.bias", ".attn.masked_bias") + (
            ("lm_head.weight",) if self.config.tie_word_embeddings else ()
        )
        if self.pipe is not None:
            weights = self.pipe.stage_weights(weights, self.config.num_layers)
        load_params(self, weights, rename, {}, skip, transform, quantize)

    def _slice(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's part of a checkpoint tensor (HF name, Conv1D already transposed): each of
        c_attn's q, k and v by heads, c_fc by output rows, the c_proj weights by input columns
        (their biases whole: added once, after the all-reduce), wte and lm_head by vocabulary rows."""
        s, full, local = self.shard, self.config, self.local
        if ".c_attn." in name:
            heads = s.q_heads(full)
            return torch.cat([s.heads(part, heads, full.head_dim) for part in t.chunk(3, dim=0)])
        if name.endswith("attn.c_proj.weight"):
            return s.cols(t, local.num_heads * full.head_dim)
        if ".c_fc." in name:
            return s.rows(t, local.intermediate_size)
        if name.endswith("mlp.c_proj.weight"):
            return s.cols(t, local.intermediate_size)
        if name.endswith(("wte.weight", "lm_head.weight")):
            return s.vocab(t)
        return t
