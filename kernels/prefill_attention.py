"""Prefill attention over the paged cache: a chunk of new tokens per sequence attends to the
sequence's cached context (prefix-cache hits, earlier chunks) and causally to itself.

`paged_prefill_attention_ref` is the plain-torch reference (the CPU backend runs it);
`paged_prefill_attention` is the Triton kernel with the same signature (FlashAttention-2
style online softmax, keys gathered page by page through the block table).

For a sequence with `context` cached tokens and `q_len` new ones (seq_len = context + q_len),
query i (0-based in the chunk) sees keys 0 .. context + i.

An fp8 cache is read as q's dtype, with its scales applied as in kernels/paged_attention.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.cache import from_cache, is_fp8
from kernels.paged_attention import load_kv_tile, paged_tile


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Keys (or values) of one sequence, [length, KVH, D], from its block table row."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    # index_select, not cache[idx]: several times faster on the CPU for the same gather.
    blocks = cache.index_select(0, block_table[:num_blocks].long())  # [nb, bs, KVH, D]
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def paged_prefill_attention_ref(
    q: torch.Tensor,  # [T, H, D], the new tokens of B sequences, concatenated
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D], new tokens already written
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32, offsets of each sequence's tokens in q
    seq_lens: torch.Tensor,  # [B] int32, cached context + new tokens
    scale: float,
    k_scale: float = 1.0,  # an fp8 cache's per-tensor scales (kernels/cache.py)
    v_scale: float = 1.0,
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
        k = from_cache(_gather(k_cache, block_tables[i], seq_len), q.dtype, k_scale).transpose(0, 1)  # (KVH, S, D)
        v = from_cache(_gather(v_cache, block_tables[i], seq_len), q.dtype, v_scale).transpose(0, 1)
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


@triton.jit
def _prefill_kernel(
    Q, K, V, Out, BlockTables, QueryStart, SeqLens,
    scale, v_scale,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    m_block = tl.program_id(2)
    q_start = tl.load(QueryStart + b)
    q_len = tl.load(QueryStart + b + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(SeqLens + b)
    context = seq_len - q_len
    kvh = h // G

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the chunk
    offs_d = tl.arange(0, D)
    m_mask = offs_m < q_len
    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None], other=0.0)  # (BLOCK_M, D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    end = tl.minimum(seq_len, context + (m_block + 1) * BLOCK_M)  # causal: no key past the last query
    for n in range(0, end, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        page, slot = paged_tile(BlockTables, b, stride_bt, offs_n, n_mask, PAGE)
        k = load_kv_tile(K, page, slot, stride_kb, stride_ks, kvh, stride_kh, offs_d, n_mask).to(q.dtype)  # (BLOCK_N, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_N)
        visible = (offs_n[None, :] <= context + offs_m[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded query rows see nothing
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        v = load_kv_tile(V, page, slot, stride_vb, stride_vs, kvh, stride_vh, offs_d, n_mask).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out = acc * v_scale / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_mask[:, None])


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D], new tokens already written
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    max_query_len: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:  # [T, H, D]
    """Triton version of paged_prefill_attention_ref. `max_query_len` (a host int) sizes the
    grid; without it the launcher reads it from query_start_loc (a device sync)."""
    T, H, D = q.shape
    _, page, KVH, Dk = k_cache.shape
    B = seq_lens.shape[0]
    assert Dk == D and v_cache.shape == k_cache.shape and H % KVH == 0, "head_dim/heads mismatch"
    assert D in (16, 32, 64, 128, 256), f"head_dim {D} must be a power of two in [16, 256]"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "last dim must be contiguous"
    assert block_tables.dtype == torch.int32 and block_tables.shape[0] == B
    assert query_start_loc.dtype == seq_lens.dtype == torch.int32 and query_start_loc.shape == (B + 1,)
    assert k_cache.dtype == v_cache.dtype and (k_cache.dtype == q.dtype or is_fp8(k_cache.dtype)), \
        "the cache must be fp8 or q's dtype"
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if B else 0
    out = torch.empty_like(q)
    if B == 0 or max_query_len == 0:
        return out
    block_m, block_n = 64, max(32, page)
    assert block_n % page == 0
    _prefill_kernel[(B, H, triton.cdiv(max_query_len, block_m))](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        scale * k_scale, v_scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        G=H // KVH, D=D, PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
