"""The architecture facts a model file needs, read once from a transformers config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.engine.errors import ModelLoadError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2: biases on q, k, v
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k
    # Longest context the architecture attends correctly (sliding-window models: the window).
    max_context: int = 0
    initializer_range: float = 0.02
    hf_config: Any = field(default=None, compare=False, repr=False)  # RoPE parameters

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED:
            raise ModelLoadError(
                f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED)}"
            )
        if model_type == "gpt2":
            return cls(
                model_type=model_type,
                vocab_size=hf.vocab_size,
                hidden_size=hf.n_embd,
                num_layers=hf.n_layer,
                num_heads=hf.n_head,
                num_kv_heads=hf.n_head,
                head_dim=hf.n_embd // hf.n_head,
                intermediate_size=hf.n_inner or 4 * hf.n_embd,
                max_position_embeddings=hf.n_positions,
                norm_eps=hf.layer_norm_epsilon,
                hidden_act=hf.activation_function,
                tie_word_embeddings=getattr(hf, "tie_word_embeddings", True),
                max_context=hf.n_positions,
                initializer_range=hf.initializer_range,
                hf_config=hf,
            )
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        max_context = hf.max_position_embeddings
        window = getattr(hf, "sliding_window", None)
        if window and getattr(hf, "use_sliding_window", True):
            max_context = min(max_context, window)
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=hf.intermediate_size,
            max_position_embeddings=hf.max_position_embeddings,
            norm_eps=hf.rms_norm_eps,
            hidden_act=hf.hidden_act,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            max_context=max_context,
            initializer_range=getattr(hf, "initializer_range", 0.02),
            hf_config=hf,
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token across all layers, per byte of element size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim
