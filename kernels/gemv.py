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
def _gemv_kernel(X, W, B, Y, N, K, stride_wn, R, G, R_OUT, eps, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    # N: outputs (with SILU_MUL, W has 2N rows: gate rows [0, N), up rows [N, 2N)).
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if USE_PDL:  # the first weight tiles are read while the kernel before finishes (kernels/pdl.py)
        offs_k0 = tl.arange(0, BLOCK_K)
        w_mask0 = n_mask[:, None] & (offs_k0 < K)[None, :]
        w_first = tl.load(W + offs_n[:, None] * stride_wn + offs_k0[None, :], mask=w_mask0, other=0.0)
        if SILU_MUL:
            w_up_first = tl.load(W + (offs_n[:, None] + N) * stride_wn + offs_k0[None, :], mask=w_mask0, other=0.0)
    wait_then_release(USE_PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if SILU_MUL:
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
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
        if SILU_MUL:
            w_up = tl.load(W + (offs_n[:, None] + N) * stride_wn + offs_k[None, :], mask=w_mask, other=0.0)
            if USE_PDL:
                w_up = tl.where(k == 0, w_up_first, w_up)
            acc_up += w_up.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    if NORM:
        rstd = tl.math.rsqrt(tl.sum(sum_sq, 0) / K + eps)
        y *= rstd
    if HAS_BIAS:
        y += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if SILU_MUL:  # rounded where kernels/activation.py's silu_and_mul rounds
        up = tl.sum(acc_up, 1)
        if NORM:
            up *= rstd
        gate = y.to(Y.dtype.element_ty).to(tl.float32)
        up = up.to(Y.dtype.element_ty).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(Y.dtype.element_ty).to(tl.float32) * up
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
    N, K = _check(x, weight, bias)
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    pdl = use_pdl(x.device)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, bias if bias is not None else y, y, N, K, weight.stride(0), x, x, x, 0.0,
        HAS_BIAS=bias is not None, NORM=False, HAS_RESIDUAL=False, SILU_MUL=False, BLOCK_N=block_n, BLOCK_K=block_k,
        USE_PDL=pdl, num_warps=num_warps, **launch_options(pdl),
    )
    return y


def norm_gemv(
    x: torch.Tensor,  # [1, K]
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]
    residual: torch.Tensor | None = None,  # [1, K]
    bias: torch.Tensor | None = None,  # [N]
    silu_mul: bool = False,
    block_n: int = 4,
    block_k: int = 512,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `norm_gemv_ref`, one launch. Without a residual, x itself is the
    residual returned. Inputs are not modified."""
    N, K = _check(x, weight, bias)
    assert norm_weight.shape == (K,) and norm_weight.is_contiguous(), "norm_weight must be contiguous [K]"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1, \
            "residual must match x"
    assert not (silu_mul and (N % 2 or bias is not None)), "silu_mul needs an even N ([gate | up]) and no bias"
    outputs = N // 2 if silu_mul else N
    y = torch.empty(1, outputs, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else x
    pdl = use_pdl(x.device)
    _gemv_kernel[(triton.cdiv(outputs, block_n),)](
        x, weight, bias if bias is not None else y, y, outputs, K, weight.stride(0),
        residual if residual is not None else x, norm_weight, res_out, eps,
        HAS_BIAS=bias is not None, NORM=True, HAS_RESIDUAL=residual is not None, SILU_MUL=silu_mul,
        BLOCK_N=block_n, BLOCK_K=block_k, USE_PDL=pdl, num_warps=num_warps, **launch_options(pdl),
    )
    return y, res_out
