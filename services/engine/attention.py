"""The attention backend interface, and the torch reference backend (CPU, and any device).

The model runner builds one `AttentionMetadata` per step; every attention layer then calls
`AttentionContext.attend(layer, q, k, v)`, which writes the new K/V into the layer's paged
cache and attends over it. A backend is only the `forward` that does this; the Triton backend
(GPU) drops in beside `TorchAttentionBackend` with the same metadata.

Token layout of a step: the decode tokens (one query token per sequence) come first, then
the chunks of the prefilling sequences:

    [ d0 d1 d2 | p0 p0 p0 p0 | p1 p1 ]      num_decode_tokens = 3
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kernels.cache import reshape_and_cache_ref
from kernels.paged_attention import paged_decode_attention_ref
from kernels.prefill_attention import paged_prefill_attention_ref


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
    decode_num_splits: int = 1  # flash-decoding splits (fixed per captured CUDA graph)

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
    ) -> torch.Tensor:  # [T, H, D]
        ...


class TorchAttentionBackend(AttentionBackend):
    """The reference: the same functions the Triton kernels are tested against."""

    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        reshape_and_cache_ref(k, v, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decode_tokens
        if meta.num_prefills == 0:
            return paged_decode_attention_ref(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = paged_decode_attention_ref(
                q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale
            )
        out[nd:] = paged_prefill_attention_ref(
            q[nd:],
            k_cache,
            v_cache,
            meta.prefill_block_tables,
            meta.prefill_query_start_loc,
            meta.prefill_seq_lens,
            scale,
        )
        return out


class TritonAttentionBackend(AttentionBackend):
    """GPU: Triton kernels for writing the cache, flash-decoding and paged prefill attention.
    No host synchronisation, so decode steps can be captured in CUDA graphs."""

    name = "triton"

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        from kernels.cache import reshape_and_cache
        from kernels.paged_attention import paged_decode_attention
        from kernels.prefill_attention import paged_prefill_attention

        reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decode_tokens
        if meta.num_prefills == 0:
            return paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale,
                                          num_splits=meta.decode_num_splits)
        out = torch.empty_like(q)
        if nd:
            paged_decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale,
                                   num_splits=meta.decode_num_splits, out=out[:nd])
        out[nd:] = paged_prefill_attention(
            q[nd:], k_cache, v_cache, meta.prefill_block_tables, meta.prefill_query_start_loc,
            meta.prefill_seq_lens, scale, max_query_len=meta.prefill_max_query_len,
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
    ) -> None:
        self.backend = backend
        self.kv_caches = kv_caches
        self.meta = meta

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        k_cache, v_cache = self.kv_caches[layer]
        return self.backend.forward(q, k, v, k_cache, v_cache, self.meta, scale)
