"""Batch-1 matrix-vector product for decode: y = x @ W^T (+ bias), one row of x.

x [1, K], W [N, K] row-major (nn.Linear's layout), y [1, N]. Each program computes BLOCK_N
outputs, streaming its BLOCK_N rows of W in BLOCK_K-wide tiles and reducing in float32.

Why it exists: at one row, cuBLAS's GEMM kernels are latency-bound on small projections. On
an H200, with cold weights (each call reads a different copy, 240 MB in all, from DRAM, as
each layer does in a forward; loadtest/profile_gpu.py's `gemv` part), this kernel took
3.1-4.0 us against cuBLAS's 3.6-5.0 us on SmolLM2-135M's four projections, and 6.0 and 5.2
against 6.6 and 6.1 us on Llama-3.2-1B's qkv and o. cuBLAS is ahead on larger weights
(Llama's 34 MB down: 13.2 against 14.4 us; its 67 MB gate_up: 18.8 against 20.7), so
services/engine/layers/linear.py uses this kernel only below 16 MB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


@triton.jit
def _gemv_kernel(X, W, B, Y, N, K, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(X + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(Y + offs_n, y.to(Y.dtype.element_ty), mask=n_mask)


def gemv(
    x: torch.Tensor,  # [1, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    block_n: int = 4,
    block_k: int = 512,
    num_warps: int = 4,
) -> torch.Tensor:  # [1, N]
    """Triton version of `gemv_ref`. The defaults were within 2% of the best of a 12-setting
    sweep on each of the small shapes above (H200)."""
    assert x.dim() == 2 and x.shape[0] == 1 and weight.dim() == 2, "x must be [1, K] and weight [N, K]"
    N, K = weight.shape
    assert x.shape[1] == K, f"x has {x.shape[1]} features, weight expects {K}"
    assert x.stride(-1) == 1 and weight.stride(-1) == 1, "last dim must be contiguous"
    assert x.dtype == weight.dtype, "x and weight dtypes differ"
    assert weight.stride(0) * N < 2**31, "weight too large for 32-bit offsets"
    assert bias is None or (bias.shape == (N,) and bias.is_contiguous()), "bias must be contiguous [N]"
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, bias if bias is not None else y, y, N, K, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    return y
