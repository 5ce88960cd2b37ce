"""Pre-quantized checkpoints: FP8 in the compressed-tensors format (what vLLM and llm-compressor
write); every other quantized checkpoint is refused with the reason.

A compressed-tensors FP8 checkpoint's config.json carries a `quantization_config` with
`quant_method: compressed-tensors`, a `float-quantized` (or `naive-quantized`) format and
groups whose weights are 8-bit floats with a `channel` or `tensor` strategy. Each quantized
Linear stores `<name>.weight` (float8_e4m3fn, (out, in)) and `<name>.weight_scale` (float32,
(out, 1) or (1,)); a static activation scheme adds `<name>.input_scale`, which is not used:
activations are always scaled per token here (quant/fp8.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from services.engine.errors import ModelLoadError
from services.engine.quant.fp8 import FP8, Fp8Weight

log = logging.getLogger("pdserve.quant")

_INT4_METHODS = ("awq", "gptq", "awq_marlin", "gptq_marlin")


def checkpoint_quantization(hf_config: Any) -> str | None:
    """'fp8' for a compressed-tensors FP8 checkpoint, None for a dense one; raises for any
    other quantized checkpoint."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = str(qc.get("quant_method", "")).lower()
    if method in _INT4_METHODS:
        raise ModelLoadError(f"{method.upper()} int4 checkpoints are not supported: load the dense (bf16/fp32) "
                             "checkpoint, with --quantization int8 or fp8 to quantize it on load")
    if method != "compressed-tensors":
        raise ModelLoadError(f"quantized checkpoints of quant_method {method!r} are not supported "
                             "(compressed-tensors FP8 is)")
    for name, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        fmt = group.get("format") or qc.get("format")
        if w.get("num_bits") == 4 or fmt == "pack-quantized":
            raise ModelLoadError(f"compressed-tensors group {name!r} holds int4 weights (W4A16, as AWQ/GPTQ): "
                                 "not supported; only FP8 checkpoints are")
        if (w.get("num_bits"), w.get("type")) != (8, "float") or w.get("strategy") not in ("channel", "tensor") \
                or fmt not in ("float-quantized", "naive-quantized"):
            raise ModelLoadError(f"compressed-tensors group {name!r} ({fmt}, {w.get('num_bits')}-bit "
                                 f"{w.get('type')}, {w.get('strategy')} strategy) is not supported: only FP8 "
                                 "weights with per-channel or per-tensor scales are")
    return "fp8"


def fp8_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor | Fp8Weight]]:
    """The checkpoint's tensors with each fp8 weight and its scale joined into an Fp8Weight."""
    waiting: dict[str, torch.Tensor] = {}  # a weight or a scale whose partner has not come yet
    for name, tensor in weights:
        if name.endswith(".input_scale"):
            continue
        is_scale = name.endswith(".weight_scale")
        if not is_scale and not (name.endswith(".weight") and tensor.dtype == FP8):
            yield name, tensor
            continue
        weight_name = name.removesuffix("_scale")
        partner = weight_name if is_scale else name + "_scale"
        if partner not in waiting:
            waiting[name] = tensor
            continue
        other = waiting.pop(partner)
        weight, scale = (other, tensor) if is_scale else (tensor, other)
        yield weight_name, Fp8Weight(weight, scale)
    if waiting:
        raise ModelLoadError(f"fp8 weights without a scale (or scales without a weight): {sorted(waiting)[:5]}")
