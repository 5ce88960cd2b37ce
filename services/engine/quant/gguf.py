"""GGUF weights kept in their block format, and a .gguf file read into them.

`--gguf-weights native` loads a GGUF model's Q8_0, Q4_0, Q4_1 and Q4_K tensors as they are
stored (`GGUFWeight`: the file's bytes, one row of blocks per output feature) and dequantizes
a slab of rows per matmul (kernels/gguf.py: torch on the CPU, Triton on a GPU, where decode
steps run a kernel that dequantizes tiles in registers inside the matmul). Tensors of
other quantized types are dequantized once at load with the `gguf` package; F32/F16/BF16 ones
load as they are.

The header and the tensors are read with plain file reads (`read_header`), not the gguf
package's memory-mapped reader: pages of a mapped file count in the process's resident memory
for as long as the map lives.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.gguf import BLOCKS, dequantize_ref
from services.engine.errors import ModelLoadError
from services.engine.quant import QuantizedWeight

log = logging.getLogger("pdserve.quant")

# GGUF tensor name (after "blk.N.") -> HF parameter name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
NATIVE_ARCHITECTURES = ("llama",)
FUSED_MAX_ROWS = 64  # tokens per step up to which a GPU matmul runs the fused kernel (not yet tuned)


class GGUFWeight(QuantizedWeight):
    """A (out, in) weight as GGUF blocks: `blocks` is (out, in / block_elements * block_bytes) uint8."""

    def __init__(self, kind: str, blocks: torch.Tensor, in_features: int) -> None:
        n, size = BLOCKS[kind]
        if in_features % n or blocks.shape[1] != in_features // n * size:
            raise ModelLoadError(f"{kind} rows of {in_features} elements are not {blocks.shape[1]} bytes")
        self.kind, self.blocks = kind, blocks
        self.shape = (blocks.shape[0], in_features)
        self.device = blocks.device

    def _dequantize(self, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if blocks.is_cuda:
            from kernels.gguf import dequantize

            return dequantize(blocks, self.kind, dtype)
        return dequantize_ref(blocks, self.kind, dtype)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return self._dequantize(self.blocks[start:stop], dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """On a GPU, up to `FUSED_MAX_ROWS` tokens (decode) go through the fused kernel, which
        reads the blocks once and writes no dense weight; more (prefill, compute-bound) are
        dequantized a slab at a time for cuBLAS."""
        if x.is_cuda and x.dim() == 2 and x.shape[0] <= FUSED_MAX_ROWS:
            from kernels.gguf import matmul

            y = matmul(x.contiguous(), self.blocks, self.kind)
            return y if bias is None else y + bias
        return super().linear(x, bias)

    def take_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._dequantize(self.blocks.index_select(0, ids.reshape(-1)), dtype).view(*ids.shape, -1)

    def to(self, device: torch.device | str) -> GGUFWeight:
        return GGUFWeight(self.kind, self.blocks.to(device), self.shape[1])

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    @classmethod
    def cat(cls, parts: list[QuantizedWeight]) -> GGUFWeight | None:
        if len({(p.kind, p.shape[1]) for p in parts}) != 1:
            return None
        return GGUFWeight(parts[0].kind, torch.cat([p.blocks for p in parts]), parts[0].shape[1])

    def permute_rows(self, order: torch.Tensor) -> GGUFWeight:
        """The rows in `order` (blocks run along the input dimension, so rows move whole)."""
        return GGUFWeight(self.kind, self.blocks.index_select(0, order), self.shape[1])


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: int  # GGMLQuantizationType
    shape: tuple[int, ...]  # innermost first, as GGUF lists it: (in, out) for a weight
    offset: int  # from the start of the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, object], list[TensorInfo]]:
    """The scalar and string metadata (arrays skipped) and the tensor table of a GGUF file.

    Read sequentially instead of through the gguf package's reader, which maps the file and
    builds an array per element of every metadata array (the 49,152-token vocabulary): seconds
    of start-up and tens of MB of Python objects for values the engine never reads.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        def take(fmt: str):
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ModelLoadError(f"GGUF file {path} is truncated")
            return struct.unpack("<" + fmt, data)[0]

        def string() -> str:
            return f.read(take("Q")).decode("utf-8", errors="replace")

        def value(vtype: int):
            if vtype == _STRING:
                return string()
            if vtype == _ARRAY:
                etype, count = take("I"), take("Q")
                if etype == _STRING:
                    for _ in range(count):
                        f.seek(take("Q"), 1)
                elif etype in _SCALARS:
                    f.seek(struct.calcsize(_SCALARS[etype]) * count, 1)
                else:
                    for _ in range(count):
                        value(etype)
                return None
            if vtype not in _SCALARS:
                raise ModelLoadError(f"GGUF file {path} has an unknown metadata type {vtype}")
            return take(_SCALARS[vtype])

        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file")
        version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
        if version < 2:
            raise ModelLoadError(f"GGUF version {version} of {path} is not supported (2 and later are)")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("I"))
        table = []
        for _ in range(n_tensors):
            name = string()
            shape = tuple(take("Q") for _ in range(take("I")))
            qtype, offset = take("I"), take("Q")
            table.append((name, qtype, shape, offset))
        align = int(meta.get("general.alignment") or 32)
        start = -(-f.tell() // align) * align
    tensors = []
    for name, qtype, shape, offset in table:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise ModelLoadError(f"GGUF tensor {name} has an unknown type {qtype}") from None
        tensors.append(TensorInfo(name, qtype, shape, start + offset, math.prod(shape) // block * block_bytes))
    return meta, tensors


def gguf_architecture(path: Path) -> str:
    return str(read_header(path)[0].get("general.architecture") or "unknown")


def iter_gguf_weights(path: Path, num_heads: int, num_kv_heads: int) -> Iterator[tuple[str, torch.Tensor | GGUFWeight]]:
    """(HF name, tensor or GGUFWeight) for every tensor of a llama-architecture GGUF file."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    meta, tensors = read_header(path)
    arch = meta.get("general.architecture")
    if arch not in NATIVE_ARCHITECTURES:
        raise ModelLoadError(f"GGUF architecture {arch!r} has no native loader ({', '.join(NATIVE_ARCHITECTURES)}): "
                             "pass --gguf-weights converted")
    with open(path, "rb") as f:
        for t in tensors:
            hf_name = _hf_name(t.name)
            raw = torch.empty(t.nbytes, dtype=torch.uint8)
            f.seek(t.offset)
            if f.readinto(memoryview(raw.numpy())) != t.nbytes:
                raise ModelLoadError(f"GGUF file {path} is truncated in tensor {t.name}")
            rows = math.prod(t.shape[1:])
            kind = GGMLQuantizationType(t.qtype).name
            if kind in BLOCKS:
                value: torch.Tensor | GGUFWeight = GGUFWeight(kind, raw.view(rows, -1), t.shape[0])
            elif kind in ("F32", "F16", "BF16"):
                dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[kind]
                value = raw.view(dtype).view(*reversed(t.shape)).float()
            else:
                log.info("GGUF tensor %s (%s) has no native kernel: dequantized at load", t.name, kind)
                value = torch.from_numpy(dequantize(raw.numpy().reshape(rows, -1), GGMLQuantizationType(t.qtype)))
                value = value.float().view(*reversed(t.shape))
            if t.name.endswith(("attn_q.weight", "attn_k.weight")):
                value = _unpermute_rope_rows(value, num_heads if "attn_q" in t.name else num_kv_heads)
            yield hf_name, value


def _hf_name(name: str) -> str:
    stem, _, suffix = name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    raise ModelLoadError(f"GGUF tensor {name} has no llama equivalent")


def _unpermute_rope_rows(w: torch.Tensor | GGUFWeight, heads: int) -> torch.Tensor | GGUFWeight:
    """llama.cpp's converter interleaves each head's rotary halves in q/k rows (its rope pairs
    adjacent elements, HF's pairs i with i + head_dim / 2); put them back in HF's order: GGUF row
    h * hd + 2i + j holds HF row h * hd + j * hd / 2 + i."""
    out = w.shape[0]
    half = out // heads // 2
    order = torch.arange(out).view(heads, half, 2).transpose(1, 2).reshape(-1)
    return w.permute_rows(order) if isinstance(w, GGUFWeight) else w.index_select(0, order)
