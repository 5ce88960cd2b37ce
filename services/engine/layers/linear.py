"""Linear layer whose matmul orientation is chosen for the CPU.

On the CPU, MKL's sgemm computes y = x @ W^T for a few rows of x markedly faster as
(W @ x^T)^T: about 2x for one decoder layer and up to 3x for the LM head at 4-32 rows on the
2-core AVX2 machine (loadtest/bench_offline_vs_hf.py records the end-to-end effect). From a
few hundred rows on, and on GPUs, the plain form is as fast or faster.

On a GPU, a single row (batch-1 decode) goes to the Triton GEMV (kernels/gemv.py), faster
than cuBLAS's GEMMs for weights up to ~16 MB; larger ones (LM heads, big MLPs) stay on
cuBLAS. There, `norm_linear` also folds the RMSNorm in front of a decoder layer's input
projections (and SwiGLU's SiLU-and-mul behind gate_up) into the same launch
(kernels/gemv.py's norm_gemv); PDSERVE_FUSE_NORM_GEMV=0 turns that off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

_FEW_ROWS = 128
_GEMV_MAX_BYTES = 16 << 20  # H200, cold weights: GEMV ahead at 12.6 MB (Llama-1B qkv), cuBLAS from 34 MB
FUSE_NORM_GEMV = os.environ.get("PDSERVE_FUSE_NORM_GEMV", "1") != "0"  # read when a forward runs (or is captured)


def _takes_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype == weight.dtype and x.stride(-1) == 1
            and weight.numel() * weight.element_size() <= _GEMV_MAX_BYTES)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, in) -> (T, out) = x @ weight^T + bias."""
    if x.is_cpu and x.dim() == 2 and 1 < x.shape[0] <= _FEW_ROWS:
        y = torch.mm(weight, x.t()).t().contiguous()
        return y if bias is None else y + bias
    if _takes_gemv(x, weight):
        from kernels.gemv import gemv

        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm: nn.Module,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu_mul: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (x alone when residual is None); returns (linear(norm(h)), h), with
    silu(gate) * up applied to the output's two halves when `silu_mul`. `norm` is an RMSNorm
    (services/engine/layers/norm.py). One Triton launch where `linear` would take the GEMV."""
    if FUSE_NORM_GEMV and _takes_gemv(x, weight) and not (silu_mul and bias is not None):
        from kernels.gemv import norm_gemv

        return norm_gemv(x, norm.weight, norm.eps, weight, residual, bias, silu_mul)
    if residual is None:
        residual, x = x, norm(x)
    else:
        x, residual = norm(x, residual)
    y = linear(x, weight, bias)
    if not silu_mul:
        return y, residual
    if y.is_cuda:  # one Triton pass instead of two ops (kernels/activation.py)
        from kernels.activation import silu_and_mul

        return silu_and_mul(y), residual
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up, residual


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
