"""Llama-family decoder: Llama 2/3, SmolLM2, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm).

Pre-norm decoder blocks with RMSNorm, rotary embeddings, grouped-query attention over the
paged KV cache, and a SwiGLU MLP. Over a flat batch of T tokens from many sequences:

    x (T, hidden) -> [RMSNorm -> attention -> +res -> RMSNorm -> MLP -> +res] x L -> RMSNorm -> logits

References: Llama (Touvron et al. 2023, arXiv:2302.13971), GQA (Ainslie et al. 2023,
arXiv:2305.13245), RoPE (Su et al. 2021, arXiv:2104.09864), Qwen2/Qwen3 technical reports;
parameter names follow transformers' modeling_llama.py so HF state dicts load directly.
q/k/v and gate/up are fused into one matmul each (fewer, larger GEMMs); at batch 1 on a GPU
each also takes the RMSNorm before it into the same kernel (layers/linear.py's norm_linear),
and qkv_proj the rotary embedding and the cache write after it (attention.py's project).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from services.engine.attention import AttentionContext
from services.engine.layers.activation import activation
from services.engine.layers.embedding import Embedding
from services.engine.layers.norm import RMSNorm
from services.engine.layers.rotary import Rope, RotaryEmbedding
from services.engine.layers.linear import Linear, norm_linear
from services.engine.layers.parallel import RowParallelLinear, VocabEmbedding, vocab_logits
from services.engine.models.config import ModelConfig
from services.engine.models.loading import load_params
from services.engine.parallel.group import Group
from services.engine.parallel.pipe import Pipe
from services.engine.parallel.shard import Shard, local_config
from services.engine.quant import QuantizedWeight

# HF parameter -> (our fused parameter, shard index)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: Group | None) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = RowParallelLinear(self.q_size, cfg.hidden_size, bias=False, tp=tp)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, rope: Rope, attn: AttentionContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """norm(x + residual) -> qkv_proj -> rotary -> attention -> o_proj; returns (out, the
        new residual). At one token on a GPU the first four are one kernel (attn.project), or
        the norm and qkv_proj are (layers/linear.py's norm_linear)."""
        T = x.shape[0]
        fused = None if self.qk_norm else attn.project(self.layer, x, residual, norm, self.qkv_proj.weight,
                                                       self.qkv_proj.bias, self.num_heads, rope)
        if fused is not None:  # k and v are in the cache; q is rotated
            q, residual = fused
            out = attn.attend(self.layer, q, None, None, self.scale)
        else:
            qkv, residual = norm_linear(x, residual, norm, self.qkv_proj.weight, self.qkv_proj.bias)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(T, self.num_heads, self.head_dim)  # (T, H, D)
            k = k.view(T, self.num_kv_heads, self.head_dim)  # (T, KVH, D)
            v = v.view(T, self.num_kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            out = attn.attend(self.layer, q, k, v, self.scale, rope)  # rotates q and k, (T, H, D)
        return self.o_proj(out.reshape(T, self.q_size)), residual


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: Group | None) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=False, tp=tp)
        self.fused_silu = cfg.hidden_act == "silu"
        self.act = None if self.fused_silu else activation(cfg.hidden_act)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: gate_up_proj's output, already through SiLU-and-mul when `fused_silu` (the
        decoder layer applies both fused with the norm in front)."""
        if not self.fused_silu:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        return self.down_proj(h)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: Group | None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer, tp)
        self.mlp = LlamaMLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x, residual, rope, attn):
        # norm -> projection (-> SiLU-and-mul): one kernel at batch 1 on a GPU (layers/linear.py)
        gate_up_proj = self.mlp.gate_up_proj
        x, residual = self.self_attn(x, residual, self.input_layernorm, rope, attn)
        h, residual = norm_linear(x, residual, self.post_attention_layernorm, gate_up_proj.weight,
                                  silu_mul=self.mlp.fused_silu)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, tp: Group | None, pipe: Pipe | None) -> None:
        """`cfg.num_layers`: this stage's layers, numbered from 0 (parallel/pipe.py)."""
        super().__init__()
        self.pipe = pipe
        if pipe is None or pipe.first:
            # one rank: a table that may stay quantized (GGUF); several: each holds its rows
            self.embed_tokens = (Embedding(cfg.vocab_size, cfg.hidden_size) if tp is None
                                 else VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp))
            self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg, i, tp) for i in range(cfg.num_layers)])
        self.rotary = RotaryEmbedding(cfg.hf_config, cfg.head_dim, max_positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext,
                num_layers: int | None = None) -> torch.Tensor:
        """The final hidden states; on a pipeline stage after the first, this stage's output."""
        pipe, dtype = self.pipe, self.layers[0].input_layernorm.weight.dtype
        first = pipe is None or pipe.first
        x = self.embed_tokens(input_ids) if first else pipe.recv_prev(len(input_ids), self.hidden_size, dtype)
        rope = self.rotary.prepare(positions, dtype)
        residual = None
        for layer in self.layers[:num_layers]:
            x, residual = layer(x, residual, rope, attn)
        if pipe is not None:  # the residual stream to the next stage; stage 0 gets the last one's back
            pipe.send_next(x if residual is None else x + residual)
            if not first:
                return x
            return self.norm(pipe.recv_prev(len(input_ids), self.hidden_size, dtype))
        x, _ = self.norm(x, residual)
        return x

    @property
    def hidden_size(self) -> int:
        return self.layers[0].input_layernorm.weight.shape[0]


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, tp: Group | None = None,
                 pipe: Pipe | None = None) -> None:
        """`tp`: build this rank's shard (its heads, MLP columns and vocabulary rows); `pipe`:
        only this pipeline stage's layers (and, on stage 0, the embedding, norm and LM head)."""
        super().__init__()
        self.config, self.tp, self.pipe = cfg, tp, pipe
        self.shard = Shard(tp.rank, tp.size) if tp is not None else None
        self.local = local_config(cfg, self.shard, pipe)
        self.model = LlamaModel(self.local, max_positions, tp, pipe)
        if not cfg.tie_word_embeddings and (pipe is None or pipe.first):
            self.lm_head = Linear(cfg.hidden_size, self.model.embed_tokens.weight.shape[0], bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext,
                num_layers: int | None = None) -> torch.Tensor:
        """(T,) token ids and positions -> (T, hidden) final hidden states; `num_layers`: after
        the first layers only, then the final norm (a self-speculative draft, spec/draft.py)."""
        return self.model(input_ids, positions, attn, num_layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        return vocab_logits(hidden, head.weight, self.config.vocab_size, self.tp)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]],
                     quantize: Callable[[torch.Tensor], QuantizedWeight] | None = None) -> None:
        """`quantize`: applied to each Linear weight that loads dense into a deferred model."""
        cfg = self.local
        shard_sizes = {
            "qkv_proj": [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2,
            "gate_up_proj": [cfg.intermediate_size] * 2,
        }

        def rename(name: str) -> tuple[str, str | None, int]:
            for hf_part, (ours, shard) in _FUSED.items():
                if f".{hf_part}." in name:
                    fused = name.replace(hf_part, ours)
                    return fused, ours, shard
            return name, None, 0

        skip = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if cfg.tie_word_embeddings else ())
        if self.pipe is not None:
            weights = self.pipe.stage_weights(weights, self.config.num_layers)
        load_params(self, weights, rename, shard_sizes, skip, self._slice if self.shard is not None else None,
                    quantize=quantize)

    def _slice(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's part of a checkpoint tensor (HF name): column-parallel q/k/v and gate/up
        by output rows, row-parallel o/down by input columns, embeddings by vocabulary rows."""
        s, full, local = self.shard, self.config, self.local
        if ".q_proj." in name:
            return s.heads(t, s.q_heads(full), full.head_dim)
        if ".k_proj." in name or ".v_proj." in name:
            return s.heads(t, s.kv_heads(full), full.head_dim)
        if ".o_proj." in name:
            return s.cols(t, local.num_heads * full.head_dim)
        if ".gate_proj." in name or ".up_proj." in name:
            return s.rows(t, local.intermediate_size)
        if ".down_proj." in name:
            return s.cols(t, local.intermediate_size)
        if "embed_tokens." in name or "lm_head." in name:
            return s.vocab(t)
        return t
