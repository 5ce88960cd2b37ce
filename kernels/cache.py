"""Writing new keys and values into the paged KV cache: a plain-torch reference and a Triton
kernel with the same signature.

    k_cache, v_cache: [num_blocks, block_size, KVH, D]
    slot = block * block_size + offset

Token t goes to slot slot_mapping[t]. A negative slot is padding (CUDA graphs pad a batch with
-1) and its token is skipped: the cache is left untouched there.

An fp8 cache (float8_e4m3fn, `--kv-cache-dtype fp8`) stores x / scale, saturated to e4m3's
+-448, with one scale per layer for K and one for V (per-tensor scales: BENCHMARKS.md has the
accuracy of per-tensor against per-block-and-head scales). Readers multiply by it back
(`from_cache`). Any other cache dtype stores x cast, and its scales are 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value; a plain cast of anything larger gives NaN


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8


def to_cache(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """x as the cache stores it: cast, or for fp8 divided by `scale` and saturated."""
    if not is_fp8(dtype):
        return x.to(dtype)
    x = x.float() if scale == 1.0 else x.float() / scale
    return x.clamp(-FP8_MAX, FP8_MAX).to(dtype)


def from_cache(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Cached values back in `dtype` (the inverse of `to_cache`, up to rounding)."""
    if is_fp8(x.dtype) and x.device.type == "cpu":
        return _fp8_bits_to(x, dtype, scale)
    x = x.to(dtype)
    return x if scale == 1.0 else x * scale


def _fp8_bits_to(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """e4m3fn -> `dtype` through float16 bits: torch's own cast is scalar on the CPU (about
    6x slower here, on every decode step's whole context). e4m3's 4 exponent and 3 mantissa
    bits become the low exponent and top mantissa bits of a float16, whose exponent bias is
    8 more (hence x 2^8; e4m3 subnormals land on float16 subnormals, exactly). Exact for every
    finite code; NaN (never written: writes saturate) reads as +-480."""
    h = x.view(torch.int8).to(torch.int16).mul_(128)  # bits 0..6 -> 7..13; sign -> 15 and 14
    h &= -16385  # clear bit 14
    return h.view(torch.float16).to(dtype).mul_(256.0 * scale)


def reshape_and_cache_ref(
    key: torch.Tensor,  # [T, KVH, D]
    value: torch.Tensor,  # [T, KVH, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    slot_mapping: torch.Tensor,  # [T] int64, negative = skip
    k_scale: float = 1.0,  # fp8 caches: the per-tensor scales (see the module docstring)
    v_scale: float = 1.0,
) -> None:
    """Write each non-padding token's K and V (in the cache's dtype) into its slot."""
    check_cache_args(key, value, k_cache, v_cache, slot_mapping)
    # Padding exists only in fixed-shape (CUDA-graph) steps; on the CPU, where this function
    # is the engine's own path, skipping the boolean mask saves three gathers per layer.
    if not (slot_mapping.is_cpu and bool((slot_mapping >= 0).all())):
        keep = slot_mapping >= 0
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    block_size = k_cache.shape[1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    # Advanced indexing, not a flat view: works for any cache strides.
    k_cache[blocks, offsets] = to_cache(key, k_cache.dtype, k_scale)
    v_cache[blocks, offsets] = to_cache(value, v_cache.dtype, v_scale)


def check_cache_args(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    assert key.dim() == 3 and key.shape == value.shape, "key/value must both be [T, KVH, D]"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "caches must be [N, bs, KVH, D]"
    assert k_cache.shape[2:] == key.shape[1:], "cache and key disagree on KVH/D"
    assert slot_mapping.dim() == 1 and slot_mapping.shape[0] == key.shape[0], "slot_mapping must be [T]"
    assert slot_mapping.dtype == torch.int64, "slot_mapping must be int64"


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kco, stride_kch,
    stride_vcb, stride_vco, stride_vch,
    block_size, KVH, D, k_scale, v_scale,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    # Masked stores rather than an early return: padding tokens (slot < 0) write nothing.
    valid = slot >= 0
    blk = slot // block_size
    off = slot % block_size
    h = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    d = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    mask = (h < KVH) & (d < D) & valid
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    if FP8:  # scaled and saturated (a cast past +-448 gives NaN)
        k = tl.minimum(tl.maximum(k.to(tl.float32) / k_scale, -448.0), 448.0)
        v = tl.minimum(tl.maximum(v.to(tl.float32) / v_scale, -448.0), 448.0)
    kc = k_cache_ptr + blk * stride_kcb + off * stride_kco + h * stride_kch + d
    vc = v_cache_ptr + blk * stride_vcb + off * stride_vco + h * stride_vch + d
    tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,  # [T, KVH, D]
    value: torch.Tensor,  # [T, KVH, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    slot_mapping: torch.Tensor,  # [T] int64, negative = skip
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Triton version of `reshape_and_cache_ref`: one program per token, all heads at once."""
    check_cache_args(key, value, k_cache, v_cache, slot_mapping)
    for t in (key, value, k_cache, v_cache):
        assert t.stride(-1) == 1, "last dim must be contiguous"
    assert slot_mapping.is_contiguous(), "slot_mapping must be contiguous"
    T, KVH, D = key.shape
    if T == 0:
        return
    _reshape_and_cache_kernel[(T,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1], KVH, D, k_scale, v_scale,
        BLOCK_H=triton.next_power_of_2(KVH), BLOCK_D=triton.next_power_of_2(D), FP8=is_fp8(k_cache.dtype),
    )
