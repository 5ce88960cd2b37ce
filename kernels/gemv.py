"""Batch-1 matrix-vector product for decode: y = x @ W^T (+ bias), one row of x, optionally
with the RMSNorm before it and SwiGLU's gate after it fused in.

x [1, K], W [N, K] row-major (nn.Linear's layout), y [1, N]. Each program computes BLOCK_N
outputs, streaming its BLOCK_N rows of W in BLOCK_K-wide tiles and reducing in float32.

Why it exists: at one row, cuBLAS's GEMM kernels are latency-bound on small projections. On
an H200, with cold weights (each call reads a different copy, 240 MB in all, from DRAM, as
each layer does in a forward; loadtest/profile_gpu.py's `gemv` part), this kernel took
3.1-4.0 us against cuBLAS's 3.6-5.0 us on SmolLM2-135M's four projections, and 6.0 and 5.2
against 6.6 and 6.1 us on Llama-3.2-1B's qkv and o. cuBLAS is ahead on larger weights
(Llama's 34 MB down: 13.2 against 14.4 us; its 67 MB gate_up: 18.8 against 20.7), so
services/engine/layers/linear.py uses this kernel only below 16 MB.

`norm_gemv` fuses what comes before and after a decoder layer's two input projections, so
that batch-1 decode launches three kernels fewer per layer (RMSNorm twice, SiLU-and-mul):

    h = x + residual                       (rounded to x's dtype; the new residual)
    y = (h * rsqrt(mean(h^2) + eps) * g) @ W^T (+ bias)
    y = silu(y[:, :N/2]) * y[:, N/2:]      (silu_mul: W is [gate | up], as gate_up_proj)

Every program needs the whole h for its mean: it accumulates h^2 over the same K tiles it
multiplies, and scales its dot products by rsqrt at the end (one pass over x; program 0
writes the new residual). The one difference from the unfused kernels: the normed
activations are not rounded to the model dtype before the product, so results agree with
rms_norm + gemv to the activation dtype's rounding, not bit for bit.

`norm_gemv_rope_cache` goes one step further for qkv_proj: each program takes rows d and
d + D/2 of one head, rotates them (the rotary embedding pairs exactly those) and stores q to
its output and k and v into their cache slot, so that kernels/rotary.py's rotary_and_cache
is not launched either (attention.py's TritonAttentionBackend.project_and_cache).

With programmatic dependent launch (kernels/pdl.py) a program reads its weights while the
kernel before it still runs, and waits only to read x: `_block_k` makes the K tile the
whole row where a program's rows fit in registers. H200, batch-1 SmolLM2 graph: 0.476 ms a
step against 0.539 with one 512-wide tile first (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.activation import silu_and_mul_ref
from kernels.pdl import launch_options, use_pdl, wait_then_release
from kernels.rmsnorm import rms_norm_ref


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def norm_gemv_ref(
    x: torch.Tensor,  # [1, K]
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]
    residual: torch.Tensor | None = None,  # [1, K]
    bias: torch.Tensor | None = None,  # [N]
    silu_mul: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [1, N] or [1, N/2] with silu_mul, the new residual [1, K]): what the unfused layer
    computes (services/engine/layers/norm.py, linear.py, llama.py's MLP)."""
    if residual is None:
        normed, residual = rms_norm_ref(x, norm_weight, eps), x
    else:
        normed, residual = rms_norm_ref(x, norm_weight, eps, residual)
    y = F.linear(normed, weight, bias)
    return (silu_and_mul_ref(y) if silu_mul else y), residual


@triton.jit
def _gemv_kernel(X, W, B, Y, N, K, stride_wn, R, G, R_OUT, eps,
                 Pos, CosSin, Slots, KCache, VCache, stride_cs, stride_kb, stride_ks, stride_kh,
                 stride_vb, stride_vs, stride_vh, block_size, H, KVH,
                 HAS_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr,
                 ROPE: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 USE_PDL: tl.constexpr):
    # Rows: BLOCK_N outputs a program, offs_n. A second row set, offs_2, when the epilogue pairs
    # rows: SILU_MUL (W has 2N rows, gate [0, N) and up [N, 2N): offs_2 = offs_n + N) and ROPE
    # (W is qkv_proj's, N = (H + 2 KVH) * D; a program takes BLOCK_N rows of one head's first
    # half and the matching rows of its second half: offs_2 = offs_n + HALF).
    pid = tl.program_id(0)
    TWO_SETS: tl.constexpr = SILU_MUL or ROPE
    if ROPE:
        per_head: tl.constexpr = HALF // BLOCK_N
        head = pid // per_head
        offs_d = (pid % per_head) * BLOCK_N + tl.arange(0, BLOCK_N)  # in [0, HALF)
        offs_n = head * 2 * HALF + offs_d
        offs_2 = offs_n + HALF
        n_mask = offs_d < HALF
    else:
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_2 = offs_n + N
        n_mask = offs_n < N
    if USE_PDL:  # the first weight tiles are read while the kernel before finishes (kernels/pdl.py)
        offs_k0 = tl.arange(0, BLOCK_K)
        w_mask0 = n_mask[:, None] & (offs_k0 < K)[None, :]
        w_first = tl.load(W + offs_n[:, None] * stride_wn + offs_k0[None, :], mask=w_mask0, other=0.0)
        if TWO_SETS:
            w2_first = tl.load(W + offs_2[:, None] * stride_wn + offs_k0[None, :], mask=w_mask0, other=0.0)
    wait_then_release(USE_PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if TWO_SETS:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if NORM:
        sum_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(X + offs_k, mask=k_mask, other=0.0)
        if HAS_RESIDUAL:  # the add rounds to the input dtype, as the reference does
            x = (x.to(tl.float32) + tl.load(R + offs_k, mask=k_mask, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(R_OUT + offs_k, x, mask=k_mask & (pid == 0))
        x = x.to(tl.float32)
        if NORM:
            sum_sq += x * x
            x *= tl.load(G + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        w_mask = n_mask[:, None] & k_mask[None, :]
        if USE_PDL:  # tile 0 is already in registers
            w_mask = w_mask & (k > 0)
        w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :], mask=w_mask, other=0.0)
        if USE_PDL:
            w = tl.where(k == 0, w_first, w)
        acc += w.to(tl.float32) * x[None, :]
        if TWO_SETS:
            w2 = tl.load(W + offs_2[:, None] * stride_wn + offs_k[None, :], mask=w_mask, other=0.0)
            if USE_PDL:
                w2 = tl.where(k == 0, w2_first, w2)
            acc2 += w2.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    if NORM:
        rstd = tl.math.rsqrt(tl.sum(sum_sq, 0) / K + eps)
        y *= rstd
    if HAS_BIAS:
        y += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if TWO_SETS:
        y2 = tl.sum(acc2, 1)
        if NORM:
            y2 *= rstd
        if HAS_BIAS:
            y2 += tl.load(B + offs_2, mask=n_mask, other=0.0).to(tl.float32)
        # rounded to the activation dtype where the unfused kernels round (their inputs)
        y = y.to(Y.dtype.element_ty).to(tl.float32)
        y2 = y2.to(Y.dtype.element_ty).to(tl.float32)
    if SILU_MUL:  # as kernels/activation.py's silu_and_mul
        y = (y / (1.0 + tl.exp(-y))).to(Y.dtype.element_ty).to(tl.float32) * y2
    if ROPE:  # as kernels/rotary.py's rotary_and_cache: q heads to Y, k and v heads to their slot
        if head < H + KVH:  # q or k: rotate the pair (element d with d + HALF) in float32
            pos = tl.load(Pos)
            cos = tl.load(CosSin + pos * stride_cs + offs_d, mask=n_mask, other=0.0)
            sin = tl.load(CosSin + pos * stride_cs + HALF + offs_d, mask=n_mask, other=0.0)
            y, y2 = y * cos - y2 * sin, y2 * cos + y * sin
        if head < H:
            tl.store(Y + offs_n, y.to(Y.dtype.element_ty), mask=n_mask)
            tl.store(Y + offs_2, y2.to(Y.dtype.element_ty), mask=n_mask)
        else:
            slot = tl.load(Slots)
            blk = slot // block_size
            off = slot % block_size
            keep = n_mask & (slot >= 0)  # a padding row (slot -1) writes nothing
            if head < H + KVH:
                dst = KCache + blk * stride_kb + off * stride_ks + (head - H) * stride_kh + offs_d
            else:
                dst = VCache + blk * stride_vb + off * stride_vs + (head - H - KVH) * stride_vh + offs_d
            tl.store(dst, y.to(KCache.dtype.element_ty), mask=keep)
            tl.store(dst + HALF, y2.to(KCache.dtype.element_ty), mask=keep)
    else:
        tl.store(Y + offs_n, y.to(Y.dtype.element_ty), mask=n_mask)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
    assert x.dim() == 2 and x.shape[0] == 1 and weight.dim() == 2, "x must be [1, K] and weight [N, K]"
    N, K = weight.shape
    assert x.shape[1] == K, f"x has {x.shape[1]} features, weight expects {K}"
    assert x.stride(-1) == 1 and weight.stride(-1) == 1, "last dim must be contiguous"
    assert x.dtype == weight.dtype, "x and weight dtypes differ"
    assert weight.stride(0) * N < 2**31, "weight too large for 32-bit offsets"
    assert bias is None or (bias.shape == (N,) and bias.is_contiguous()), "bias must be contiguous [N]"
    return N, K


PREFETCH_ROWS = True  # with PDL, read a program's whole rows of W before waiting (see _block_k)
_PREFETCH_ELEMENTS = 8192  # weights one program may hold in registers: 64 a thread at 4 warps


def _block_k(K: int, rows: int, pdl: bool) -> int:
    """The K tile. With PDL the tile at k = 0 is read before the kernel waits for its input,
    while the kernel before it still runs: one tile as wide as K (when a program's `rows`
    rows of it fit in registers) makes that all of the program's weights, so that after the
    wait only x is read. Without PDL, 512 (the sweep's best)."""
    if pdl and PREFETCH_ROWS:
        whole = triton.next_power_of_2(K)
        if rows * whole <= _PREFETCH_ELEMENTS:
            return whole
    return 512


_NO_ROPE = dict(Pos=None, CosSin=None, Slots=None, KCache=None, VCache=None, stride_cs=0, stride_kb=0, stride_ks=0,
                stride_kh=0, stride_vb=0, stride_vs=0, stride_vh=0, block_size=1, H=0, KVH=0, ROPE=False, HALF=1)


def _launch(grid: int, x, weight, bias, y, N: int, K: int, rows: int, block_n: int, block_k: int | None,
            num_warps: int, residual=None, norm_weight=None, res_out=None, eps: float = 0.0, silu_mul: bool = False,
            rope: dict | None = None) -> None:
    """One _gemv_kernel launch; `rows` is how many rows of W one program reads."""
    pdl = use_pdl(x.device)
    _gemv_kernel[(grid,)](
        x, weight, bias if bias is not None else y, y, N, K, weight.stride(0),
        residual if residual is not None else x, norm_weight if norm_weight is not None else x,
        res_out if res_out is not None else x, eps,
        **(rope or _NO_ROPE),
        HAS_BIAS=bias is not None, NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None,
        SILU_MUL=silu_mul, BLOCK_N=block_n, BLOCK_K=block_k or _block_k(K, rows, pdl), USE_PDL=pdl,
        num_warps=num_warps, **launch_options(pdl),
    )


def gemv(
    x: torch.Tensor,  # [1, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    block_n: int = 4,
    block_k: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:  # [1, N]
    """Triton version of `gemv_ref`. The defaults were within 2% of the best of a 12-setting
    sweep on each of the small shapes above (H200); `block_k` None: see `_block_k`."""
    N, K = _check(x, weight, bias)
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    _launch(triton.cdiv(N, block_n), x, weight, bias, y, N, K, block_n, block_n, block_k, num_warps)
    return y


def _check_norm(x, norm_weight, residual) -> None:
    K = x.shape[1]
    assert norm_weight.shape == (K,) and norm_weight.is_contiguous(), "norm_weight must be contiguous [K]"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1, \
            "residual must match x"


def norm_gemv(
    x: torch.Tensor,  # [1, K]
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]
    residual: torch.Tensor | None = None,  # [1, K]
    bias: torch.Tensor | None = None,  # [N]
    silu_mul: bool = False,
    block_n: int = 4,
    block_k: int | None = None,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `norm_gemv_ref`, one launch. Without a residual, x itself is the
    residual returned. Inputs are not modified."""
    N, K = _check(x, weight, bias)
    _check_norm(x, norm_weight, residual)
    assert not (silu_mul and (N % 2 or bias is not None)), "silu_mul needs an even N ([gate | up]) and no bias"
    outputs = N // 2 if silu_mul else N
    y = torch.empty(1, outputs, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else x
    _launch(triton.cdiv(outputs, block_n), x, weight, bias, y, outputs, K, block_n * (2 if silu_mul else 1), block_n,
            block_k, num_warps, residual, norm_weight, res_out, eps, silu_mul)
    return y, res_out


def norm_gemv_rope_cache_ref(
    x: torch.Tensor,  # [1, K]
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [(H + 2 KVH) * D, K]: qkv_proj's
    residual: torch.Tensor | None,  # [1, K]
    bias: torch.Tensor | None,  # [(H + 2 KVH) * D]
    num_heads: int,
    positions: torch.Tensor,  # [1] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, D] float32
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [1] int64, negative = skip
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated q [1, H, D], the new residual): the unfused chain of a decoder layer's
    attention input at one token, RMSNorm(+residual) -> qkv_proj -> rotary_and_cache (the
    rotated k and v written into their slot)."""
    from kernels.rotary import rotary_and_cache_ref

    qkv, residual = norm_gemv_ref(x, norm_weight, eps, weight, residual, bias)
    kvh, D = k_cache.shape[2], k_cache.shape[3]
    q, k, v = qkv.view(1, num_heads + 2 * kvh, D).split([num_heads, kvh, kvh], dim=1)
    return rotary_and_cache_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping), residual


def norm_gemv_rope_cache(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_heads: int,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_n: int = 4,
    block_k: int | None = None,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `norm_gemv_rope_cache_ref`, one launch: each program computes BLOCK_N
    rows of one head's first half and the matching rows of its second half, so that it can
    rotate them (rotate-half pairs element d with d + D/2) and store q to the output, k and
    v into the cache slot. One token only; inputs are not modified."""
    N, K = _check(x, weight, bias)
    _check_norm(x, norm_weight, residual)
    _, block_size, kvh, D = k_cache.shape
    assert v_cache.shape == k_cache.shape and k_cache.dtype == v_cache.dtype == x.dtype, "caches must match x"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache last dim must be contiguous"
    assert N == (num_heads + 2 * kvh) * D, "weight rows must be (H + 2 KVH) * D"
    assert D >= 2 and D & (D - 1) == 0, "head_dim must be a power of two"
    half = D // 2
    block_n = min(block_n, half)
    assert positions.shape == (1,) and positions.dtype == torch.int64, "positions must be int64 [1]"
    assert slot_mapping.shape == (1,) and slot_mapping.dtype == torch.int64, "slot_mapping must be int64 [1]"
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == D and cos_sin_cache.dtype == torch.float32
    assert cos_sin_cache.stride(-1) == 1, "cos_sin_cache last dim must be contiguous"
    q = torch.empty(1, num_heads, D, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else x
    rope = dict(Pos=positions, CosSin=cos_sin_cache, Slots=slot_mapping, KCache=k_cache, VCache=v_cache,
                stride_cs=cos_sin_cache.stride(0), stride_kb=k_cache.stride(0), stride_ks=k_cache.stride(1),
                stride_kh=k_cache.stride(2), stride_vb=v_cache.stride(0), stride_vs=v_cache.stride(1),
                stride_vh=v_cache.stride(2), block_size=block_size, H=num_heads, KVH=kvh, ROPE=True, HALF=half)
    grid = (num_heads + 2 * kvh) * triton.cdiv(half, block_n)
    _launch(grid, x, weight, bias, q, N, K, 2 * block_n, block_n, block_k, num_warps, residual, norm_weight, res_out,
            eps, rope=rope)
    return q, res_out
