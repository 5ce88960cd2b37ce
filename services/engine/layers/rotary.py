"""Rotary position embedding (RoPE) with a precomputed cos/sin table.

Inverse frequencies come from transformers' RoPE functions (default, linear, dynamic, yarn,
longrope, llama3 scaling), so every scaling scheme matches the reference exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True, eq=False)
class Rope:
    """The rotation of one forward pass, applied to every layer as `q, k = rope(q, k)`.

    `positions` and the [cos | sin] table are what the Triton kernels read (the Triton
    attention backend rotates while writing the cache: kernels/rotary.py's
    rotary_and_cache). On the CPU, cos and sin are also gathered once per forward.
    """

    positions: torch.Tensor  # [T] int64
    cos_sin: torch.Tensor  # [max_pos, D] float32: [cos | sin] of the first half
    cos: torch.Tensor | None = None  # [T, 1, D] in the activation dtype (CPU path)
    sin: torch.Tensor | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos is None:
            from kernels.rotary import rotary

            return rotary(q, k, self.positions, self.cos_sin)
        return apply_rotary(q, k, self.cos, self.sin)


def _inv_freq(hf_config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    # Imported only here: a follower rank of a default-RoPE model never imports transformers.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config, None)


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config: Any, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv_freq, scaling = _inv_freq(hf_config, head_dim)
        positions = torch.arange(max_positions, dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :]  # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, D)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)
        # The Triton kernel's layout: [cos | sin] of the first half (kernels/rotary.py).
        half = head_dim // 2
        self.register_buffer("cos_sin_half", torch.cat((self.cos[:, :half], self.sin[:, :half]), -1),
                             persistent=False)

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """The rotation of one forward pass, applied to every layer's q and k (`rope(q, k)`).

        CPU: cos/sin are gathered once per forward. GPU: the Triton kernels gather them.
        """
        if positions.is_cuda:
            return Rope(positions, self.cos_sin_half)
        cos, sin = self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]  # (T, 1, D)
        return Rope(positions, self.cos_sin_half, cos, sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (T, H, D), k: (T, KVH, D); cos/sin: (T, 1, D)."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
