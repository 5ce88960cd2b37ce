"""Paged decode attention: one query token per sequence over its cached keys and values.

`paged_decode_attention_ref` is the plain-torch reference (the CPU backend runs it);
`paged_decode_attention` is the Triton kernel with the same signature.

Flash-decoding (split-K): a sequence's context is cut into NUM_SPLITS contiguous ranges so
that few long sequences still fill the GPU; each program computes, for one (sequence, KV
head, split), the attention of all G = H / KVH query heads of the group against that range
(K and V are read once per group, not once per query head), and writes a partial output and
its log-sum-exp; a second kernel merges the splits.

    grid 1: (B, KVH, NUM_SPLITS)  ->  mid_out [B, H, NUM_SPLITS, D] (fp32), mid_lse [B, H, NUM_SPLITS]
    grid 2: (B, H)                ->  out [B, H, D]

Cache layout, per layer: [num_blocks, block_size, KVH, D], and
slot = block_table[pos // block_size] * block_size + pos % block_size. Block-table rows are
padded with any valid block id past a sequence's length (masked by seq_lens). A tile of
BLOCK_N tokens spans BLOCK_N / block_size pages, gathered through the block table. Nothing in
the Triton launch reads a value on the host, so it is CUDA-graph safe for a fixed num_splits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


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


@triton.jit
def paged_tile(BlockTables, b, stride_bt, offs_n, n_mask, PAGE: tl.constexpr):
    """Pool block (int64: big pools pass 2^31 elements) and in-block slot of tokens offs_n of row b."""
    page = tl.load(BlockTables + b * stride_bt + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
    return page, offs_n % PAGE


@triton.jit
def load_kv_tile(Cache, page, slot, stride_b, stride_s, kvh, stride_h, offs_d, n_mask):
    """(BLOCK_N, D) keys or values of one KV head; rows past the sequence read as 0."""
    return tl.load(Cache + page[:, None] * stride_b + slot[:, None] * stride_s + kvh * stride_h + offs_d[None, :],
                   mask=n_mask[:, None], other=0.0)


@triton.jit
def _decode_split_kernel(
    Q, K, V, BlockTables, SeqLens, MidO, MidLse,
    scale,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    heads = kvh * G + offs_g
    g_mask = offs_g < G
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)

    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D], dtype=tl.float32)
    for n in range(start, end, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        page, slot = paged_tile(BlockTables, b, stride_bt, offs_n, n_mask, PAGE)
        k = load_kv_tile(K, page, slot, stride_kb, stride_ks, kvh, stride_kh, offs_d, n_mask)  # (BLOCK_N, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (G_PAD, BLOCK_N)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = load_kv_tile(V, page, slot, stride_vb, stride_vs, kvh, stride_vh, offs_d, n_mask)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    has = start < end
    out = tl.where(has, acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None], 0.0)
    lse = tl.where(has, m_i + tl.log(tl.where(l_i == 0.0, 1.0, l_i)), float("-inf"))
    tl.store(MidO + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :], out,
             mask=g_mask[:, None])
    tl.store(MidLse + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


@triton.jit
def _decode_merge_kernel(
    MidO, MidLse, Out,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    D: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, D)
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([D], dtype=tl.float32)
    for s in range(NUM_SPLITS):
        lse = tl.load(MidLse + b * stride_lb + h * stride_lh + s + tl.arange(0, 1))
        o = tl.load(MidO + b * stride_ob + h * stride_oh + s * stride_os + offs_d)
        m_new = tl.maximum(m, lse)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale_old = tl.exp(m - safe)
        w = tl.exp(lse - safe)
        acc = acc * scale_old + o * w
        total = total * scale_old + w
        m = m_new
    tl.store(Out + b * stride_outb + h * stride_outh + offs_d, (acc / total).to(Out.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Triton flash-decoding; same result as paged_attention.paged_decode_attention_ref.

    `block_n` (tokens per tile), `num_warps` and `num_stages` are tuning knobs for
    loadtest/profile_gpu.py's sweep; None takes the defaults below.
    """
    B, H, D = q.shape
    num_blocks, page, KVH, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and H % KVH == 0, "head_dim/heads mismatch"
    assert D in (16, 32, 64, 128, 256), f"head_dim {D} must be a power of two in [16, 256]"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "last dim must be contiguous"
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2 and block_tables.shape[0] == B
    assert seq_lens.dtype == torch.int32 and seq_lens.shape == (B,)
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q and cache dtypes differ"
    G = H // KVH
    block_n = block_n or max(64, page)  # several pages per tile: longer, fewer loads
    assert block_n % page == 0 or page % block_n == 0, "a tile spans whole pages, or a page whole tiles"
    # 4 warps, 2 stages: within 3% of the best of a 60-setting sweep on every shape tried (H200).
    launch = {"num_warps": num_warps or 4, "num_stages": num_stages or 2}
    mid_o = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q) if out is None else out
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_split_kernel[(B, KVH, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, mid_o, mid_lse,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, PAGE=page,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, PRECISION=precision, **launch,
    )
    _decode_merge_kernel[(B, H)](
        mid_o, mid_lse, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        D=D, NUM_SPLITS=num_splits,
    )
    return out
