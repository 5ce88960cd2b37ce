"""Linear layer whose matmul orientation is chosen for the CPU.

On the CPU, MKL's sgemm computes y = x @ W^T for a few rows of x markedly faster as
(W @ x^T)^T: about 2x for one decoder layer and up to 3x for the LM head at 4-32 rows on the
2-core AVX2 machine (loadtest/bench_offline_vs_hf.py records the end-to-end effect). From a
few hundred rows on, and on GPUs, the plain form is as fast or faster.

On a GPU, a single row (batch-1 decode) goes to the Triton GEMV (kernels/gemv.py), faster
than cuBLAS's GEMMs for weights up to ~16 MB; larger ones (LM heads, big MLPs) stay on
cuBLAS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_FEW_ROWS = 128
_GEMV_MAX_BYTES = 16 << 20  # H200, cold weights: GEMV ahead at 12.6 MB (Llama-1B qkv), cuBLAS from 34 MB


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, in) -> (T, out) = x @ weight^T + bias."""
    if x.is_cpu and x.dim() == 2 and 1 < x.shape[0] <= _FEW_ROWS:
        y = torch.mm(weight, x.t()).t().contiguous()
        return y if bias is None else y + bias
    if (x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype == weight.dtype and x.stride(-1) == 1
            and weight.numel() * weight.element_size() <= _GEMV_MAX_BYTES):
        from kernels.gemv import gemv

        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
