"""RMSNorm with an optional residual add before it: a plain-torch reference (the exact maths of
services/engine/layers/norm.py, which matches HF transformers) and a fused Triton kernel.

    if residual: x = x + residual; residual = x      # add in the input dtype
    out = weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import launch_options, use_pdl, wait_then_release


def rms_norm_ref(
    x: torch.Tensor,  # [T, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, hidden], same dtype as x
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`out`, or `(out, x + residual)` when a residual is given. Inputs are not modified."""
    if residual is not None:
        x = x + residual
        residual = x
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * x32.to(x.dtype)
    return out if residual is None else (out, residual)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, N, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0)
    wait_then_release(USE_PDL)  # x and the residual come from earlier kernels (kernels/pdl.py)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # Rounded to the input dtype before the norm, as the reference does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * N + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    var = tl.sum(x32 * x32, axis=0) / N
    y = (x32 * tl.math.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    # Product of two <=16-bit floats is exact in fp32, so one rounding, like torch's.
    out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(out_ptr + row * N + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [T, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, hidden], same dtype as x
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rms_norm_ref`: one program per row, residual add, fp32 variance and
    scale fused. Writes fresh tensors; inputs are not modified."""
    assert x.dim() == 2 and x.stride(-1) == 1, "x must be [T, hidden] with contiguous rows"
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported {x.dtype}"
    T, N = x.shape
    assert weight.shape == (N,) and weight.is_contiguous(), "weight must be [hidden]"
    assert N <= 8192, "hidden > 8192 does not fit one block"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, "residual must match x"
        assert residual.stride(-1) == 1, "residual rows must be contiguous"
    # Same promotion as `weight * y` in the reference (fp32 weight with fp16 x gives fp32).
    out = torch.empty((T, N), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if T > 0:
        BLOCK = triton.next_power_of_2(N)
        pdl = use_pdl(x.device)
        _rms_norm_kernel[(T,)](
            x, residual if residual is not None else x, weight, out,
            res_out if res_out is not None else out,
            x.stride(0), residual.stride(0) if residual is not None else 0, N, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=BLOCK, num_warps=min(max(BLOCK // 256, 1), 16), USE_PDL=pdl,
            **launch_options(pdl),
        )
    return out if res_out is None else (out, res_out)
