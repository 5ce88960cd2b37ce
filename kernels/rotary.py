"""Rotary position embedding, "rotate half" convention (HF Llama): element i pairs with
element i + D/2. A plain-torch reference and a Triton kernel with the same signature.

    cos_sin_cache[p] = [ cos(p * inv_freq) | sin(p * inv_freq) ]     # [D/2 | D/2], float32
    out[:D/2] = x1 * cos - x2 * sin,   out[D/2:] = x2 * cos + x1 * sin

Both compute in float32 and cast back to the input dtype. Neither modifies q or k: each
returns new tensors.

`rotary_and_cache` fuses the rotation with writing the new keys and values into the paged
KV cache (kernels/cache.py's layout): k goes rotated straight into its slot and only the
rotated q comes back. One launch per layer instead of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.cache import check_cache_args
from kernels.cache import reshape_and_cache_ref
from kernels.pdl import launch_options, use_pdl, wait_then_release


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x32 = x.float()
    x1, x2 = x32[..., :half], x32[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rotary_ref(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    positions: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, D] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k), as new tensors."""
    half = q.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions)[:, None, :]  # (T, 1, D)
    cos, sin = cs[..., :half], cs[..., half:]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


@triton.jit
def _rotate_heads(
    src, stride_src_h, dst, stride_dst_h, n_heads, cos, sin, valid,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Rotate one token's n_heads heads from src to dst (each head's D elements contiguous)."""
    h = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    d = tl.arange(0, HALF)[None, :]  # [1, HALF]
    mask = (h < n_heads) & (d < HALF) & valid
    x1 = tl.load(src + h * stride_src_h + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + h * stride_src_h + HALF + d, mask=mask, other=0.0).to(tl.float32)
    out = dst + h * stride_dst_h + d
    tl.store(out, (x1 * cos - x2 * sin).to(dst.dtype.element_ty), mask=mask)
    tl.store(out + HALF, (x2 * cos + x1 * sin).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _cos_sin(pos_ptr, cs_ptr, t, stride_cs, HALF: tl.constexpr):
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)[None, :]  # [1, HALF], broadcast over heads
    return tl.load(cs_ptr + pos * stride_cs + d), tl.load(cs_ptr + pos * stride_cs + HALF + d)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cs_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs, H, KVH,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr,
):
    t = tl.program_id(0)
    cos, sin = _cos_sin(pos_ptr, cs_ptr, t, stride_cs, HALF)
    D: tl.constexpr = 2 * HALF
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, q_out_ptr + t * H * D, D, H, cos, sin, True, HALF, BLOCK_H)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, k_out_ptr + t * KVH * D, D, KVH, cos, sin, True, HALF, BLOCK_KVH)


def _check_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    assert q.dim() == 3 and k.dim() == 3, "q must be [T, H, D] and k [T, KVH, D]"
    T, D = q.shape[0], q.shape[2]
    assert k.shape[0] == T and k.shape[2] == D, "q and k disagree on T or D"
    assert q.dtype == k.dtype, "q and k must share a dtype"
    assert D >= 2 and D & (D - 1) == 0, "head_dim must be a power of two"
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "last dim must be contiguous"
    assert positions.shape == (T,) and positions.dtype == torch.int64, "positions must be int64 [T]"
    assert positions.is_contiguous(), "positions must be contiguous"
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == D, "cos_sin_cache must be [P, D]"
    assert cos_sin_cache.dtype == torch.float32 and cos_sin_cache.stride(-1) == 1


def rotary(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    positions: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, D] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rotary_ref`: one program per token rotates all of its q and k heads.
    Returns new contiguous tensors; q and k are not modified."""
    _check_rotary(q, k, positions, cos_sin_cache)
    T, H, D = q.shape
    KVH = k.shape[1]
    q_out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((T, KVH, D), dtype=k.dtype, device=k.device)
    if T > 0:
        _rotary_kernel[(T,)](
            q, k, q_out, k_out, positions, cos_sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0), H, KVH,
            HALF=D // 2, BLOCK_H=triton.next_power_of_2(H), BLOCK_KVH=triton.next_power_of_2(KVH),
        )
    return q_out, k_out


def rotary_and_cache_ref(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,  # [T, KVH, D]
    positions: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, D] float32
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, negative = skip
) -> torch.Tensor:
    """Rotate q and k; write the rotated k and v into their slots; return the rotated q."""
    q, k = rotary_ref(q, k, positions, cos_sin_cache)
    reshape_and_cache_ref(k, v, k_cache, v_cache, slot_mapping)
    return q


@triton.jit
def _rotary_and_cache_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, cs_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_kcb, stride_kco, stride_kch, stride_vcb, stride_vco, stride_vch,
    block_size, H, KVH,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr, USE_PDL: tl.constexpr,
):
    t = tl.program_id(0)
    wait_then_release(USE_PDL)  # q, k, v come from the kernel before (kernels/pdl.py)
    cos, sin = _cos_sin(pos_ptr, cs_ptr, t, stride_cs, HALF)
    D: tl.constexpr = 2 * HALF
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, q_out_ptr + t * H * D, D, H, cos, sin, True, HALF, BLOCK_H)
    slot = tl.load(slot_ptr + t)
    valid = slot >= 0  # padding tokens (slot < 0) write nothing to the cache
    blk = slot // block_size
    off = slot % block_size
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, k_cache_ptr + blk * stride_kcb + off * stride_kco, stride_kch,
                  KVH, cos, sin, valid, HALF, BLOCK_KVH)
    h = tl.arange(0, BLOCK_KVH)[:, None]
    d = tl.arange(0, D)[None, :]
    mask = (h < KVH) & valid
    value = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(v_cache_ptr + blk * stride_vcb + off * stride_vco + h * stride_vch + d,
             value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_and_cache(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,  # [T, KVH, D]
    positions: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, D] float32
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, negative = skip
) -> torch.Tensor:
    """Triton version of `rotary_and_cache_ref`: one program per token. Returns the rotated q
    (new, contiguous); q, k and v are not modified."""
    _check_rotary(q, k, positions, cos_sin_cache)
    check_cache_args(k, v, k_cache, v_cache, slot_mapping)
    for x in (v, k_cache, v_cache):
        assert x.stride(-1) == 1, "last dim must be contiguous"
    assert slot_mapping.is_contiguous(), "slot_mapping must be contiguous"
    T, H, D = q.shape
    KVH = k.shape[1]
    q_out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    if T > 0:
        pdl = use_pdl(q.device)
        _rotary_and_cache_kernel[(T,)](
            q, k, v, q_out, k_cache, v_cache, positions, cos_sin_cache, slot_mapping,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            k_cache.shape[1], H, KVH,
            HALF=D // 2, BLOCK_H=triton.next_power_of_2(H), BLOCK_KVH=triton.next_power_of_2(KVH), USE_PDL=pdl,
            **launch_options(pdl),
        )
    return q_out
