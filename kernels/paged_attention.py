"""Paged decode attention: one query token per sequence over its cached keys and values.

`paged_decode_attention_ref` is the plain-torch reference (the CPU backend runs it);
`paged_decode_attention` is the Triton kernel with the same signature.

Flash-decoding (split-K): a sequence's context is cut into up to NUM_SPLITS contiguous
ranges of at least MIN_SPLIT tokens, so that few long sequences still fill the GPU while
short ones are split less or not at all. Each program computes, for one (sequence, KV head,
split), the attention of all G = H / KVH query heads of the group against that range (K and
V are read once per group, not once per query head), and writes a partial output and its
log-sum-exp. The splits are merged in the same launch: each program takes a ticket from its
(sequence, KV head) counter after writing its partial, and the one that draws the last
ticket merges the group's partials and resets the counter to zero. One launch per layer,
not two; a sequence that fits one split is written directly, with no partial.

    grid: (B, KVH, NUM_SPLITS)  ->  mid_out [B, H, NUM_SPLITS, D] (fp32), mid_lse [B, H, NUM_SPLITS]
                                ->  out [B, H, D]   (by the last split of each group)

Cache layout, per layer: indexed [num_blocks, block_size, KVH, D] with any strides (the
engine stores each block head-major, so a program's reads of one page are one contiguous
run), and slot = block_table[pos // block_size] * block_size + pos % block_size. Block-table rows are
padded with any valid block id past a sequence's length (masked by seq_lens). A tile of
BLOCK_N tokens spans BLOCK_N / block_size pages, gathered through the block table. Nothing in
the Triton launch reads a value on the host, so it is CUDA-graph safe for a fixed num_splits.

An fp8 cache (kernels/cache.py) is read as q's dtype: its K scale folds into the softmax
scale, its V scale multiplies the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.cache import from_cache, is_fp8
from kernels.pdl import launch_options, use_pdl, wait_then_release


def paged_decode_attention_ref(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, tokens in cache per sequence (incl. the new one)
    scale: float,
    k_scale: float = 1.0,  # an fp8 cache's per-tensor scales (kernels/cache.py)
    v_scale: float = 1.0,
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
    k = from_cache(k_cache.index_select(0, idx), q.dtype, k_scale).view(B, S, KVH, D).transpose(1, 2)  # (B, KVH, S, D)
    v = from_cache(v_cache.index_select(0, idx), q.dtype, v_scale).view(B, S, KVH, D).transpose(1, 2)
    mask = torch.arange(S, device=q.device)[None, :] < seq_lens[:, None].to(q.device)  # (B, S)
    # The G = H / KVH query heads sharing a KV head attend to the same keys: treat them as
    # G query rows of that head, so no KV head is repeated.
    qg = q.view(B, KVH, H // KVH, D)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return out.reshape(B, H, D)


MIN_SPLIT_LEN = 64  # default fewest tokens per split: one tile (the engine passes its own)


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
def _merge_splits(MidO, MidLse, b, heads, g_mask, offs_d, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                  used_splits, G_PAD: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Log-sum-exp merge of one group's partial outputs (splits 0 .. used_splits-1, none
    empty) -> (G_PAD, D) fp32. Unrolled with masks rather than a loop of used_splits, so all
    loads are in flight at once; they go to L2 (.cg): other SMs wrote the partials."""
    m = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    total = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D], dtype=tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        used = g_mask & (s < used_splits)
        lse = tl.load(MidLse + b * stride_lb + heads * stride_lh + s, mask=used, other=float("-inf"),
                      cache_modifier=".cg")
        o = tl.load(MidO + b * stride_ob + heads[:, None] * stride_oh + s * stride_os + offs_d[None, :],
                    mask=used[:, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padding heads and unused splits: -inf
        scale_old = tl.exp(m - safe)
        w = tl.exp(lse - safe)
        acc = acc * scale_old[:, None] + o * w[:, None]
        total = total * scale_old + w
        m = m_new
    return acc / tl.where(total == 0.0, 1.0, total)[:, None]


@triton.jit
def _attend_tile(q, k, v, n_mask, m_i, l_i, acc, scale, PRECISION: tl.constexpr):
    """One tile of online softmax: (m_i, l_i, acc) updated with keys k and values v. A tile
    with no valid token (a split past its sequence) leaves them at zero, not NaN. An fp8 tile
    is widened to q's dtype (exact: e4m3 fits bf16 and fp16)."""
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (G_PAD, BLOCK_N)
    s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _decode_kernel(
    Q, K, V, BlockTables, SeqLens, MidO, MidLse, Out, Counters,
    scale, v_scale,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    KVH: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # Lengths and block tables are written before the step's first kernel, and every cached
    # token but the newest by earlier steps: the first tile is read before the wait, while the
    # kernel before (which writes q and the newest token's K/V) still runs (kernels/pdl.py).
    seq_len = tl.load(SeqLens + b)
    # At most NUM_SPLITS ranges of whole tiles, none shorter than MIN_SPLIT tokens: a short
    # sequence uses fewer splits (less to write and merge); the programs past it do nothing.
    split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N, MIN_SPLIT)
    used_splits = tl.cdiv(seq_len, split_len)
    start = split * split_len
    if NUM_SPLITS > 1 and start >= seq_len:  # a split past the sequence: nothing to read or write
        return
    end = tl.minimum(start + split_len, seq_len)

    offs_d = tl.arange(0, D)
    offs_n = start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < end
    page, slot = paged_tile(BlockTables, b, stride_bt, offs_n, n_mask, PAGE)
    if USE_PDL:
        early = n_mask & (offs_n < seq_len - 1)  # the tokens no kernel of this step writes
    else:
        early = n_mask
    k = load_kv_tile(K, page, slot, stride_kb, stride_ks, kvh, stride_kh, offs_d, early)  # (BLOCK_N, D)
    v = load_kv_tile(V, page, slot, stride_vb, stride_vs, kvh, stride_vh, offs_d, early)
    wait_then_release(USE_PDL)
    if USE_PDL:  # the newest token, if this tile holds it
        newest = (n_mask & (offs_n == seq_len - 1))[:, None]
        k = tl.load(K + page[:, None] * stride_kb + slot[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :],
                    mask=newest, other=k)
        v = tl.load(V + page[:, None] * stride_vb + slot[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :],
                    mask=newest, other=v)

    offs_g = tl.arange(0, G_PAD)
    heads = kvh * G + offs_g
    g_mask = offs_g < G
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)

    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D], dtype=tl.float32)
    m_i, l_i, acc = _attend_tile(q, k, v, n_mask, m_i, l_i, acc, scale, PRECISION)
    for n in range(start + BLOCK_N, end, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        page, slot = paged_tile(BlockTables, b, stride_bt, offs_n, n_mask, PAGE)
        k = load_kv_tile(K, page, slot, stride_kb, stride_ks, kvh, stride_kh, offs_d, n_mask)
        v = load_kv_tile(V, page, slot, stride_vb, stride_vs, kvh, stride_vh, offs_d, n_mask)
        m_i, l_i, acc = _attend_tile(q, k, v, n_mask, m_i, l_i, acc, scale, PRECISION)

    acc = acc * v_scale  # 1 but for an fp8 cache; the merge below is linear in the partials
    out_ptrs = Out + b * stride_outb + heads[:, None] * stride_outh + offs_d[None, :]
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    if NUM_SPLITS == 1:
        tl.store(out_ptrs, (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=g_mask[:, None])
    elif used_splits == 1:  # the sequence fits one split: no partials, no ticket
        tl.store(out_ptrs, (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=g_mask[:, None])
    else:
        tl.store(MidO + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
                 acc / l_safe[:, None], mask=g_mask[:, None])
        tl.store(MidLse + b * stride_lb + heads * stride_lh + split, m_i + tl.log(l_safe), mask=g_mask)
        # Every thread's partial is written (barrier) before the ticket releases it to the group
        # (acq_rel at GPU scope); the last ticket's acquire makes all the group's partials visible.
        tl.debug_barrier()
        counter = Counters + b * KVH + kvh
        ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if ticket == used_splits - 1:
            merged = _merge_splits(MidO, MidLse, b, heads, g_mask, offs_d, stride_ob, stride_oh, stride_os,
                                   stride_lb, stride_lh, used_splits, G_PAD, D, NUM_SPLITS)
            tl.store(out_ptrs, merged.to(Out.dtype.element_ty), mask=g_mask[:, None])
            tl.atomic_xchg(counter, 0)  # ready for the next launch (and the next CUDA-graph replay)


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    min_split_len: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Triton flash-decoding; same result as paged_attention.paged_decode_attention_ref.

    `counters`: int32, at least B * KVH zeros, left zeroed: the split tickets. Callers that
    launch many times (every layer, CUDA graphs) pass one persistent buffer; None allocates
    a zeroed one per call. `num_splits` is the most ranges a sequence is cut into;
    `min_split_len` (a multiple of the tile) the fewest tokens in one, so short sequences
    use fewer. `block_n` (tokens per tile), `num_warps` and `num_stages` are
    tuning knobs for loadtest/profile_gpu.py's sweep; None takes the defaults below.
    """
    B, H, D = q.shape
    num_blocks, page, KVH, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and H % KVH == 0, "head_dim/heads mismatch"
    assert D in (16, 32, 64, 128, 256), f"head_dim {D} must be a power of two in [16, 256]"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "last dim must be contiguous"
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2 and block_tables.shape[0] == B
    assert seq_lens.dtype == torch.int32 and seq_lens.shape == (B,)
    assert k_cache.dtype == v_cache.dtype and (k_cache.dtype == q.dtype or is_fp8(k_cache.dtype)), \
        "the cache must be fp8 or q's dtype"
    assert num_splits >= 1, "num_splits must be at least 1"
    G = H // KVH
    block_n = block_n or max(64, page)  # several pages per tile: longer, fewer loads
    assert block_n >= 16 and block_n & (block_n - 1) == 0, "block_n must be a power of two >= 16 (tl.dot)"
    assert block_n % page == 0 or page % block_n == 0, "a tile spans whole pages, or a page whole tiles"
    min_split_len = min_split_len or -(-MIN_SPLIT_LEN // block_n) * block_n
    assert min_split_len % block_n == 0, f"min_split_len {min_split_len} must be a multiple of the tile {block_n}"
    # 4 warps, 2 stages: within 3% of the best of a 60-setting sweep on every shape tried (H200).
    launch = {"num_warps": num_warps or 4, "num_stages": num_stages or 2}
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1, "out must be like q"
    if num_splits > 1:
        mid_o = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
        if counters is None:
            counters = torch.zeros(B * KVH, dtype=torch.int32, device=q.device)
        assert counters.dtype == torch.int32 and counters.is_contiguous() and counters.numel() >= B * KVH, \
            "counters must be int32 and hold B * KVH zeros"
    else:  # no partials: the one-split kernel stores to out and reads none of these
        mid_o = mid_lse = counters = out
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    # 128-token tiles are for batches of several programs an SM, where a launch takes tens
    # of microseconds and PDL's overlap buys nothing; launched back to back with PDL, such
    # a launch ran 1.35x slower (H200, 64 x 1k tokens: 51 against 38 us; cause not
    # established), so it is launched in plain stream order.
    pdl = use_pdl(q.device) and block_n <= 64
    _decode_kernel[(B, KVH, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, mid_o, mid_lse, out, counters,
        scale * k_scale, v_scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        KVH=KVH, G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, PAGE=page,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, MIN_SPLIT=min_split_len, PRECISION=precision, USE_PDL=pdl,
        **launch, **launch_options(pdl),
    )
    return out
