"""Rotary position embedding, "rotate half" convention (HF Llama): element i pairs with
element i + D/2. A plain-torch reference and a Triton kernel with the same signature.

    cos_sin_cache[p] = [ cos(p * inv_freq) | sin(p * inv_freq) ]     # [D/2 | D/2], float32
    out[:D/2] = x1 * cos - x2 * sin,   out[D/2:] = x2 * cos + x1 * sin

Both compute in float32 and cast back to the input dtype. Neither modifies q or k: each
returns new tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    src_ptr, dst_ptr, t, stride_t, stride_h, n_heads, cos, sin,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    d = tl.arange(0, HALF)[None, :]  # [1, HALF]
    mask = (h < n_heads) & (d < HALF)
    src = src_ptr + t * stride_t + h * stride_h + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = dst_ptr + (t * n_heads + h) * (2 * HALF) + d  # dst is contiguous [T, n_heads, D]
    tl.store(dst, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cs_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs, H, KVH,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr,
):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)[None, :]  # [1, HALF], broadcast over heads
    cos = tl.load(cs_ptr + pos * stride_cs + d)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + d)
    _rotate_heads(q_ptr, q_out_ptr, t, stride_qt, stride_qh, H, cos, sin, HALF, BLOCK_H)
    _rotate_heads(k_ptr, k_out_ptr, t, stride_kt, stride_kh, KVH, cos, sin, HALF, BLOCK_KVH)


def rotary(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    positions: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, D] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rotary_ref`: one program per token rotates all of its q and k heads.
    Returns new contiguous tensors; q and k are not modified."""
    assert q.dim() == 3 and k.dim() == 3, "q must be [T, H, D] and k [T, KVH, D]"
    T, H, D = q.shape
    KVH = k.shape[1]
    assert k.shape[0] == T and k.shape[2] == D, "q and k disagree on T or D"
    assert q.dtype == k.dtype, "q and k must share a dtype"
    assert D >= 2 and D & (D - 1) == 0, "head_dim must be a power of two"
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "last dim must be contiguous"
    assert positions.shape == (T,) and positions.dtype == torch.int64, "positions must be int64 [T]"
    assert positions.is_contiguous(), "positions must be contiguous"
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == D, "cos_sin_cache must be [P, D]"
    assert cos_sin_cache.dtype == torch.float32 and cos_sin_cache.stride(-1) == 1
    q_out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((T, KVH, D), dtype=k.dtype, device=k.device)
    if T > 0:
        _rotary_kernel[(T,)](
            q, k, q_out, k_out, positions, cos_sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0), H, KVH,
            HALF=D // 2, BLOCK_H=triton.next_power_of_2(H), BLOCK_KVH=triton.next_power_of_2(KVH),
        )
    return q_out, k_out
