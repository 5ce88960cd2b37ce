"""int8 weight-only quantization with one scale per output channel (`--quantization int8`).

W[o, :] ~= scale[o] * q[o, :], q = round(W / scale) in [-127, 127], scale = max |W[o, :]| / 127.
Activations stay in the model's dtype: a matmul dequantizes a slab of rows at a time
(QuantizedWeight.linear), a quarter of fp32's weight bytes in memory.
"""

from __future__ import annotations

import torch

from services.engine.quant import QuantizedWeight


class Int8Weight(QuantizedWeight):
    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        assert qweight.dtype == torch.int8 and qweight.dim() == 2 and scale.shape == (qweight.shape[0],)
        self.qweight, self.scale = qweight, scale.float()
        self.shape = tuple(qweight.shape)
        self.device = qweight.device

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Int8Weight:
        w = w.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        # int8 * float32 promotes inside the one multiplication (no float copy of q first)
        return torch.mul(self.qweight[start:stop], self.scale[start:stop, None]).to(dtype)

    def take_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.qweight.index_select(0, flat).float() * self.scale.index_select(0, flat)[:, None]
        return rows.to(dtype).view(*ids.shape, -1)

    def to(self, device: torch.device | str) -> Int8Weight:
        return Int8Weight(self.qweight.to(device), self.scale.to(device))

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + 4 * self.scale.numel()

    @classmethod
    def cat(cls, parts: list[QuantizedWeight]) -> Int8Weight:
        return Int8Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.scale for p in parts]))
