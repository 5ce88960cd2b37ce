"""Quantized weights: what a Linear (or an Embedding) holds in place of a dense weight.

A `QuantizedWeight` is not a tensor. `layers/linear.py`'s `linear` hands it the activations
and it computes x @ W^T itself: by dequantizing a slab of rows at a time into the activations'
dtype and multiplying (every format; no dense copy of the whole weight ever exists), or by a
kernel that reads the quantized weight directly (formats' own `linear`: fp8's
`torch._scaled_mm` on Hopper, GGUF's fused Triton matmul for GPU decode steps).

    format      module      built from
    GGUF Q8_0, Q4_0, Q4_1, Q4_K   gguf.py   a .gguf file's blocks, kept as stored
    int8        int8.py     a dense checkpoint, per-output-channel scales
    fp8 (e4m3)  fp8.py      a dense checkpoint, or a compressed-tensors FP8 checkpoint

The weights of GGUF models are quantized in the file; `--quantization int8|fp8` quantizes a
dense (fp32/bf16) checkpoint's Linear weights as they load (`quantizer`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# Weights dequantized per matmul slab. CPU: 256 KB in fp32, which stays in a core's L2 cache
# between being written and being multiplied (a Q4_1 576 x 1536 product, one core: 5.3 ms
# at 2^16, 14.4 ms at 2^20; 2026-12-05). GPU (prefill; decode takes fused kernels): few,
# large GEMMs.
_SLAB_ELEMENTS = 1 << 16
_GPU_SLAB_ELEMENTS = 1 << 24

QUANTIZATIONS = ("int8", "fp8")


class QuantizedWeight:
    """A (out_features, in_features) weight in some quantized layout."""

    shape: tuple[int, int]
    device: torch.device

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, stop) of W as a dense (stop - start, in_features) tensor."""
        raise NotImplementedError

    def take_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of W, dense (an embedding lookup)."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> QuantizedWeight:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    @classmethod
    def cat(cls, parts: list[QuantizedWeight]) -> QuantizedWeight | None:
        """The parts stacked along the output dimension (fused q/k/v, gate/up), or None where
        they cannot be stacked without dequantizing."""
        return None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_rows(0, self.shape[0], dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (T, in) -> (T, out) = x @ W^T + bias, one dequantized slab of rows at a time."""
        out_features, in_features = self.shape
        rows = max(1, (_SLAB_ELEMENTS if x.is_cpu else _GPU_SLAB_ELEMENTS) // in_features)
        if rows >= out_features:
            return F.linear(x, self.dequantize_rows(0, out_features, x.dtype), bias)
        y = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
        for start in range(0, out_features, rows):
            stop = min(start + rows, out_features)
            torch.matmul(x, self.dequantize_rows(start, stop, x.dtype).t(), out=y[..., start:stop])
        return y if bias is None else y + bias

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, device={self.device})"


def quantizer(name: str | None) -> Callable[[torch.Tensor], QuantizedWeight] | None:
    """The function that quantizes a dense Linear weight for `--quantization name`."""
    if name is None:
        return None
    if name == "int8":
        from services.engine.quant.int8 import Int8Weight

        return Int8Weight.quantize
    if name == "fp8":
        from services.engine.quant.fp8 import Fp8Weight

        return Fp8Weight.quantize
    raise ValueError(f"unknown quantization {name!r} ({', '.join(QUANTIZATIONS)})")


def stack(parts: list[torch.Tensor | QuantizedWeight]) -> torch.Tensor | QuantizedWeight:
    """Shards of one fused weight as one: quantized parts stay quantized where their format
    allows it, otherwise every part is dequantized."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    kinds = {type(p) for p in parts}
    if len(kinds) == 1:
        fused = kinds.pop().cat(parts)
        if fused is not None:
            return fused
    dtype = next((p.dtype for p in parts if isinstance(p, torch.Tensor)), torch.float32)
    return torch.cat([p if isinstance(p, torch.Tensor) else p.dequantize(dtype) for p in parts])
