"""Attention over a paged KV cache: plain-torch references (the CPU backend runs these).

Cache layout, per layer:

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot = block_table[pos // block_size] * block_size + pos % block_size

A sequence's keys live in the blocks its row of `block_tables` lists, in order; rows are
padded with any valid block id past the sequence's length (masked by `seq_lens`).
GQA: query head h reads KV head h // (num_heads // num_kv_heads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reshape_and_cache_ref(
    key: torch.Tensor,  # [T, KVH, D]
    value: torch.Tensor,  # [T, KVH, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """Write each token's K and V into its slot of the paged cache."""
    assert key.shape == value.shape and key.dim() == 3, "key/value must be [T, KVH, D]"
    assert k_cache.shape[2:] == key.shape[1:], "cache and key disagree on heads/head_dim"
    assert slot_mapping.shape == key.shape[:1]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Keys (or values) of one sequence, [length, KVH, D], from its block table row."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    # index_select, not cache[idx]: several times faster on the CPU for the same gather.
    blocks = cache.index_select(0, block_table[:num_blocks].long())  # [nb, bs, KVH, D]
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def paged_decode_attention_ref(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, tokens in cache per sequence (incl. the new one)
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    """One query token per sequence attending to all of its cached tokens."""
    B, H, D = q.shape
    num_blocks, block_size, KVH, Dk = k_cache.shape
    assert Dk == D and H % KVH == 0, "head_dim mismatch or H not a multiple of KVH"
    assert block_tables.shape[0] == B and seq_lens.shape == (B,)
    max_len = int(seq_lens.max())
    max_blocks = -(-max_len // block_size)
    idx = block_tables[:, :max_blocks].reshape(-1).long()
    S = max_blocks * block_size
    k = k_cache.index_select(0, idx).view(B, S, KVH, D).transpose(1, 2)  # (B, KVH, S, D)
    v = v_cache.index_select(0, idx).view(B, S, KVH, D).transpose(1, 2)
    mask = torch.arange(S, device=q.device)[None, :] < seq_lens[:, None].to(q.device)  # (B, S)
    # The G = H / KVH query heads sharing a KV head attend to the same keys: treat them as
    # G query rows of that head, so no KV head is repeated.
    qg = q.view(B, KVH, H // KVH, D)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return out.reshape(B, H, D)


def paged_prefill_attention_ref(
    q: torch.Tensor,  # [T, H, D], the new tokens of B sequences, concatenated
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D], new tokens already written
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32, offsets of each sequence's tokens in q
    seq_lens: torch.Tensor,  # [B] int32, cached context + new tokens
    scale: float,
) -> torch.Tensor:  # [T, H, D]
    """A chunk of new tokens per sequence attending to the sequence's earlier tokens
    (prefix-cache hits, earlier chunks) and causally to each other."""
    T, H, D = q.shape
    KVH = k_cache.shape[2]
    assert H % KVH == 0 and k_cache.shape[3] == D
    assert query_start_loc.shape[0] == seq_lens.shape[0] + 1 == block_tables.shape[0] + 1
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        k = _gather(k_cache, block_tables[i], seq_len).transpose(0, 1)  # (KVH, S, D)
        v = _gather(v_cache, block_tables[i], seq_len).transpose(0, 1)
        qi = q[q_start:q_end].transpose(0, 1)  # (H, q_len, D)
        if q_len == seq_len:
            o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            context = seq_len - q_len
            rows = torch.arange(q_len, device=q.device)[:, None] + context
            mask = torch.arange(seq_len, device=q.device)[None, :] <= rows  # (q_len, S)
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[q_start:q_end] = o.transpose(0, 1)
    return out
