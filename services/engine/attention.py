"""The attention backend interface, and the torch reference backend (CPU, and any device).

The model runner builds one `AttentionMetadata` per step; every attention layer then calls
`AttentionContext.attend(layer, q, k, v, scale, rope)`, which rotates q and k (if the model
uses rotary embeddings), writes the new K/V into the layer's paged cache and attends over
it. A backend is only the `forward` that does this; the Triton backend (GPU) drops in beside
`TorchAttentionBackend` with the same metadata.

A backend may also take over the step before: `AttentionContext.project(...)` asks it to
compute RMSNorm -> qkv_proj -> rotary -> cache write as one kernel (the Triton backend does
for a single decode token: kernels/gemv.py's norm_gemv_rope_cache); it returns the rotated
q, and `attend(layer, q, None, None, scale)` then reads k and v from the cache. None means
"not here": the layer runs the unfused chain.

Token layout of a step: the decode tokens (one query token per sequence) come first, then
the chunks of the prefilling sequences:

    [ d0 d1 d2 | p0 p0 p0 p0 | p1 p1 ]      num_decode_tokens = 3

An fp8 KV cache (`--kv-cache-dtype fp8`) has a (K, V) scale per layer (kernels/cache.py);
the context hands each layer's pair to the backend, which writes and reads with them.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.cache import reshape_and_cache_ref
from kernels.paged_attention import paged_decode_attention_ref
from kernels.prefill_attention import paged_prefill_attention_ref
from services.engine.layers.rotary import Rope


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of every token of the step
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32
    decode_seq_lens: torch.Tensor  # [num_decodes] int32
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks] int32
    prefill_query_start_loc: torch.Tensor  # [num_prefills + 1] int32, relative to the first prefill token
    prefill_seq_lens: torch.Tensor  # [num_prefills] int32
    prefill_max_query_len: int = 0  # host copies of what kernels' grids need (no device reads)
    # flash-decoding's (most splits, fewest tokens each, tokens per tile); fixed per graph
    decode_split: tuple[int, int, int] = (1, 64, 64)

    @property
    def num_prefills(self) -> int:
        return self.prefill_seq_lens.shape[0]


class AttentionBackend(ABC):
    name: str

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KVH, D]
        v: torch.Tensor,  # [T, KVH, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        rope: Rope | None = None,  # applied to q and k before anything else; None: no rotation
        kv_scale: tuple[float, float] = (1.0, 1.0),  # an fp8 cache's (K, V) scales
    ) -> torch.Tensor:  # [T, H, D]
        """k and v None: project_and_cache has already written them (q is rotated)."""
        ...

    def project_and_cache(self, x, residual, norm, weight, bias, num_heads, k_cache, v_cache, meta, rope):
        """(rotated q [T, H, D], the new residual) with k and v written into the cache, or
        None where this backend has no fused kernel for the step (the default)."""
        return None


class TorchAttentionBackend(AttentionBackend):
    """The reference: the same functions the Triton kernels are tested against."""

    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, rope=None, kv_scale=(1.0, 1.0)):
        if rope is not None:
            q, k = rope(q, k)
        reshape_and_cache_ref(k, v, k_cache, v_cache, meta.slot_mapping, *kv_scale)
        nd = meta.num_decode_tokens
        if meta.num_prefills == 0:
            return paged_decode_attention_ref(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale,
                                              *kv_scale)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = paged_decode_attention_ref(
                q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale, *kv_scale
            )
        out[nd:] = paged_prefill_attention_ref(
            q[nd:],
            k_cache,
            v_cache,
            meta.prefill_block_tables,
            meta.prefill_query_start_loc,
            meta.prefill_seq_lens,
            scale,
            *kv_scale,
        )
        return out


FUSE_QKV_ROPE_CACHE = True  # TritonAttentionBackend.project_and_cache; off: a benchmark's baseline


class TritonAttentionBackend(AttentionBackend):
    """GPU: Triton kernels for writing the cache, flash-decoding and paged prefill attention.
    No host synchronisation, so decode steps can be captured in CUDA graphs."""

    name = "triton"

    def __init__(self) -> None:
        # Flash-decoding's split tickets (kernels/paged_attention.py): one zeroed int32 per
        # (sequence, KV head), shared by every layer's launch, left zeroed by each. Outgrown
        # buffers are kept: a captured CUDA graph holds the address it was captured with.
        self._counters: list[torch.Tensor] = []

    def split_counters(self, n: int, device: torch.device) -> torch.Tensor:
        if not self._counters or self._counters[-1].numel() < n:
            assert not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()), \
                "split counters must be allocated before CUDA-graph capture (capture the largest batch first)"
            self._counters.append(torch.zeros(max(n, 1024), dtype=torch.int32, device=device))
        return self._counters[-1]

    def project_and_cache(self, x, residual, norm, weight, bias, num_heads, k_cache, v_cache, meta, rope):
        """One decode token on the GEMV path (layers/linear.py): RMSNorm(+residual), qkv_proj,
        rotary and the cache write as one launch. Not into an fp8 cache (its write scales)."""
        from kernels.cache import is_fp8
        from services.engine.layers import linear

        if is_fp8(k_cache.dtype) or not (FUSE_QKV_ROPE_CACHE and linear.FUSE_NORM_GEMV and rope is not None and meta.num_prefills == 0
                and meta.num_decode_tokens == 1 and linear._takes_gemv(x, weight)):
            return None
        from kernels.gemv import norm_gemv_rope_cache

        return norm_gemv_rope_cache(x, norm.weight, norm.eps, weight, residual, bias, num_heads, rope.positions,
                                    rope.cos_sin, k_cache, v_cache, meta.slot_mapping)

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, rope=None, kv_scale=(1.0, 1.0)):
        from kernels.cache import is_fp8, reshape_and_cache
        from kernels.paged_attention import paged_decode_attention
        from kernels.prefill_attention import paged_prefill_attention
        from kernels.rotary import rotary_and_cache

        k_scale, v_scale = kv_scale
        if k is None:  # project_and_cache wrote k and v and rotated q
            pass
        elif rope is not None and not is_fp8(k_cache.dtype):  # one launch: rotate q and k, write k and v
            q = rotary_and_cache(q, k, v, rope.positions, rope.cos_sin, k_cache, v_cache, meta.slot_mapping)
        else:  # an fp8 cache: rotate, then the scaled write (two launches)
            if rope is not None:
                q, k = rope(q, k)
            reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        nd = meta.num_decode_tokens
        out = torch.empty_like(q)
        if nd:
            counters = self.split_counters(nd * k_cache.shape[2], q.device)
            num_splits, min_split_len, block_n = meta.decode_split
            paged_decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale,
                                   num_splits=num_splits, min_split_len=min_split_len, block_n=block_n,
                                   out=out[:nd], counters=counters, k_scale=k_scale, v_scale=v_scale)
        if meta.num_prefills:
            out[nd:] = paged_prefill_attention(
                q[nd:], k_cache, v_cache, meta.prefill_block_tables, meta.prefill_query_start_loc,
                meta.prefill_seq_lens, scale, max_query_len=meta.prefill_max_query_len, k_scale=k_scale, v_scale=v_scale,
            )
        return out


def get_backend(name: str, device: torch.device) -> AttentionBackend:
    """`auto`: Triton on CUDA devices, the torch reference elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the triton attention backend needs a CUDA device (or TRITON_INTERPRET=1)")
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r} (auto, torch, triton)")


class AttentionContext:
    """What a model's attention layers see during one forward: caches, metadata, backend."""

    def __init__(
        self,
        backend: AttentionBackend,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        kv_scales: list[tuple[float, float]] | None = None,  # per layer; None: all 1 (not fp8, or unscaled)
        after_layer: Callable[[int], None] | None = None,
    ) -> None:
        """`after_layer(layer)` runs once each layer has written its K/V (layer-wise KV export)."""
        self.backend = backend
        self.kv_caches = kv_caches
        self.meta = meta
        self.kv_scales = kv_scales
        self.after_layer = after_layer

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, scale: float,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        k_cache, v_cache = self.kv_caches[layer]
        kv_scale = self.kv_scales[layer] if self.kv_scales is not None else (1.0, 1.0)
        out = self.backend.forward(q, k, v, k_cache, v_cache, self.meta, scale, rope, kv_scale)
        if self.after_layer is not None:
            self.after_layer(layer)
        return out

    def project(
        self, layer: int, x: torch.Tensor, residual: torch.Tensor | None, norm: torch.nn.Module, weight: torch.Tensor,
        bias: torch.Tensor | None, num_heads: int, rope: Rope | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fused attention input of one layer (see the module docstring), or None."""
        k_cache, v_cache = self.kv_caches[layer]
        return self.backend.project_and_cache(x, residual, norm, weight, bias, num_heads, k_cache, v_cache, self.meta,
                                              rope)
