"""Linear layer whose matmul orientation is chosen for the CPU.

On some CPUs, MKL's sgemm computes y = x @ W^T for a few rows of x markedly faster as
(W @ x^T)^T: about 2x for one decoder layer and up to 3x for the LM head at 4-32 rows on the
2-core AMD EPYC machine of 2026-11-25; on the 2-core Intel Xeon of 2026-12-05 the plain form
was faster (the default model's decode steps: 12% less end to end). So the CPU engine times
both over its own weights once at start-up (`choose_cpu_orientation`) and keeps the faster.
From a few hundred rows on, and on GPUs, the plain form is as fast or faster.

On a GPU, a single row (batch-1 decode) goes to the Triton GEMV (kernels/gemv.py), faster
than cuBLAS's GEMMs for weights up to ~16 MB; larger ones (LM heads, big MLPs) stay on
cuBLAS. There, `norm_linear` also folds the RMSNorm in front of a decoder layer's input
projections (and SwiGLU's SiLU-and-mul behind gate_up) into the same launch
(kernels/gemv.py's norm_gemv); PDSERVE_FUSE_NORM_GEMV=0 turns that off.

A quantized weight (services/engine/quant) computes its own product; Linears built inside
`deferred_weights()` start on the meta device, so a quantized model never holds a dense copy.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.quant import QuantizedWeight

_FEW_ROWS = 128
_cpu_transposed = True  # few-row CPU products as (W @ x^T)^T; set by choose_cpu_orientation
_GEMV_MAX_BYTES = 16 << 20  # H200, cold weights: GEMV ahead at 12.6 MB (Llama-1B qkv), cuBLAS from 34 MB
FUSE_NORM_GEMV = os.environ.get("PDSERVE_FUSE_NORM_GEMV", "1") != "0"  # read when a forward runs (or is captured)


_deferred = False  # Linear and Embedding weights built now go on the meta device (deferred_weights)


@contextlib.contextmanager
def deferred_weights() -> Iterator[None]:
    """Weights of Linears (and layers/embedding.py's Embeddings) built inside are placeholders
    on the meta device: loading installs each, dense or quantized (models/loading.py)."""
    global _deferred
    previous, _deferred = _deferred, True
    try:
        yield
    finally:
        _deferred = previous


def _takes_gemv(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> bool:
    return (isinstance(weight, torch.Tensor) and x.is_cuda and x.dim() == 2 and x.shape[0] == 1
            and x.dtype == weight.dtype and x.stride(-1) == 1
            and weight.numel() * weight.element_size() <= _GEMV_MAX_BYTES)


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, in) -> (T, out) = x @ weight^T + bias."""
    if isinstance(weight, QuantizedWeight):
        return weight.linear(x, bias)
    if _cpu_transposed and x.is_cpu and x.dim() == 2 and 1 < x.shape[0] <= _FEW_ROWS:
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
    weight: torch.Tensor | QuantizedWeight,
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


def choose_cpu_orientation(weights: list[torch.Tensor], rows: int = 16, rounds: int = 3) -> bool:
    """Time a few-row product with each of `weights` in both forms, interleaved, best of
    `rounds` passes each, and keep the faster form for every later CPU call; returns whether
    the transposed form won. A pass over the model's own weights reads them from memory as a
    decode step does (one weight timed alone stays in cache and favours another form)."""
    global _cpu_transposed
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}

    def one_pass(transposed: bool) -> float:
        start = time.perf_counter()
        for w in weights:
            x = inputs[w.shape[1]]
            torch.mm(w, x.t()).t().contiguous() if transposed else F.linear(x, w)
        return time.perf_counter() - start

    with torch.inference_mode():
        plain, transposed = [], []
        for _ in range(rounds):
            plain.append(one_pass(False))
            transposed.append(one_pass(True))
    _cpu_transposed = min(transposed) < min(plain)
    return _cpu_transposed


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias, device="meta" if _deferred else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
