"""SwiGLU's gate: silu(gate) * up over the fused gate_up projection, as one pass.

The reference is what the eager MLP computes (two torch ops, each rounding to the input
dtype); the Triton kernel reads gate_up once, writes the output once, and rounds at the same
two places (its exp may differ from torch's in the last float32 bit):

    y   = silu(float(gate)).to(dtype)
    out = (float(y) * float(up)).to(dtype)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = [gate | up] -> [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, I, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0)
    y = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    out = y.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton version of `silu_and_mul_ref`."""
    assert x.dim() == 2 and x.stride(-1) == 1 and x.shape[1] % 2 == 0, "x must be [T, 2I], rows contiguous"
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported {x.dtype}"
    T, I = x.shape[0], x.shape[1] // 2
    out = torch.empty(T, I, dtype=x.dtype, device=x.device)
    if T > 0:
        block = min(1024, triton.next_power_of_2(I))
        _silu_and_mul_kernel[(T, triton.cdiv(I, block))](x, out, x.stride(0), out.stride(0), I, BLOCK=block,
                                                          num_warps=4)
    return out
