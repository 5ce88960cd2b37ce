"""Model architectures, one file each, selected by the transformers config's model_type.

Every model has the same surface:
    forward(input_ids (T,), positions (T,), attn) -> hidden (T, hidden_size)
    compute_logits(hidden (N, hidden_size)) -> (N, vocab_size)
    load_weights(iterable of (HF parameter name, tensor))
"""

from __future__ import annotations

from torch import nn

from services.engine.models.config import ModelConfig
from services.engine.models.gpt2 import GPT2LMHeadModel
from services.engine.models.llama import LlamaForCausalLM
from services.engine.parallel.group import Group
from services.engine.parallel.pipe import Pipe

_REGISTRY: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "gpt2": GPT2LMHeadModel,
}


def build_model(cfg: ModelConfig, max_positions: int, tp: Group | None = None,
                pipe: Pipe | None = None) -> nn.Module:
    """The whole model, or this rank's part of it: its shard with `tp` (parallel/shard.py), its
    stage's layers with `pipe` (parallel/pipe.py)."""
    return _REGISTRY[cfg.model_type](cfg, max_positions, tp, pipe)


__all__ = ["ModelConfig", "build_model"]
