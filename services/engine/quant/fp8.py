"""fp8 (e4m3) weights with one scale per output channel (`--quantization fp8`, or an FP8
checkpoint in the compressed-tensors format, whose per-tensor scales are spread per channel).

W[o, :] ~= scale[o] * q[o, :], q = W / scale in e4m3 (max 448), scale = max |W[o, :]| / 448.

On a GPU with fp8 tensor cores (compute capability 8.9+: Ada, Hopper) and bf16/fp16
activations, a matmul is w8a8 through `torch._scaled_mm`: each token's activations are
quantized to e4m3 with their own scale (dynamic, per token) and the product is rescaled by
both scales. Elsewhere (the CPU, older GPUs, fp32 activations) the weight is dequantized a
slab of rows at a time (weight-only), so the CPU tests run the same weights.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from services.engine.quant import QuantizedWeight

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


class Fp8Weight(QuantizedWeight):
    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        assert qweight.dtype == FP8 and qweight.dim() == 2, "an (out, in) float8_e4m3fn weight"
        scale = scale.float().reshape(-1)
        if scale.numel() == 1:  # per tensor
            scale = scale.expand(qweight.shape[0]).contiguous()
        assert scale.shape == (qweight.shape[0],), "one scale per tensor or per output channel"
        self.qweight, self.scale = qweight, scale
        self.shape = tuple(qweight.shape)
        self.device = qweight.device

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Fp8Weight:
        w = w.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
        return cls((w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight[start:stop].to(torch.float32) * self.scale[start:stop, None]).to(dtype)

    def take_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.qweight.index_select(0, flat).float() * self.scale.index_select(0, flat)[:, None]
        return rows.to(dtype).view(*ids.shape, -1)

    def to(self, device: torch.device | str) -> Fp8Weight:
        return Fp8Weight(self.qweight.to(device), self.scale.to(device))

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + 4 * self.scale.numel()

    @classmethod
    def cat(cls, parts: list[QuantizedWeight]) -> Fp8Weight:
        return Fp8Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.scale for p in parts]))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if takes_scaled_mm(x, self):
            return scaled_mm_linear(x, self, bias)
        return super().linear(x, bias)


@functools.cache
def _has_fp8_tensor_cores(device: int) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


def takes_scaled_mm(x: torch.Tensor, w: Fp8Weight) -> bool:
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 2
            and _has_fp8_tensor_cores(x.device.index or 0) and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, in) -> (e4m3 (T, in), float32 scales (T, 1)): each row scaled by its own max."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def scaled_mm_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """w8a8: x (T, in) -> (T, out) with per-token activation and per-channel weight scales.
    `_scaled_mm` takes row counts in multiples of 16, so T is padded with zero rows."""
    T = x.shape[0]
    padded = -(-T // 16) * 16
    if padded != T:
        x = F.pad(x, (0, 0, 0, padded - T))
    xq, x_scale = quantize_per_token(x)
    y = torch._scaled_mm(xq, w.qweight.t(), scale_a=x_scale, scale_b=w.scale.view(1, -1),
                         bias=bias, out_dtype=x.dtype)
    return y[:T]
