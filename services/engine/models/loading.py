"""Copy an HF-named state dict into a model, fusing shards (q/k/v, gate/up) on the way.

A parameter built on the meta device (layers/linear.py's deferred_weights) is installed
instead of copied into: its shards are stacked once all have arrived, a Linear's weight is
quantized on the way where `quantize` is given, and a quantized weight
(services/engine/quant) replaces the parameter as a plain attribute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from services.engine.errors import ModelLoadError
from services.engine.quant import QuantizedWeight, stack

# name -> (our parameter name, fused parameter it is a shard of (or None), shard index)
Renamer = Callable[[str], tuple[str, str | None, int]]
Weight = torch.Tensor | QuantizedWeight


@torch.no_grad()
def load_params(
    model: nn.Module,
    weights: Iterable[tuple[str, Weight]],
    rename: Renamer,
    shard_sizes: dict[str, list[int]],
    skip: tuple[str, ...] = (),
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    quantize: Callable[[torch.Tensor], QuantizedWeight] | None = None,
) -> None:
    """Load every parameter exactly once; unknown, misshapen or missing weights are errors."""
    params = dict(model.named_parameters())
    expected = set()
    for pname in params:
        fused = next((f for f in shard_sizes if f".{f}." in pname), None)
        shards = range(len(shard_sizes[fused])) if fused else range(1)
        expected.update((pname, s) for s in shards)

    loaded: set[tuple[str, int]] = set()
    pending: dict[str, dict[int, Weight]] = {}  # meta parameters' shards, until all have arrived
    for name, tensor in weights:
        if name.endswith(skip):
            continue
        target, fused, shard = rename(name)
        param = params.get(target)
        if param is None:
            raise ModelLoadError(f"checkpoint has a weight this model does not: {name}")
        if transform is not None:
            tensor = transform(name, tensor)
        loaded.add((target, shard))
        if param.is_meta:
            parts = pending.setdefault(target, {})
            parts[shard] = tensor
            if len(parts) == (len(shard_sizes[fused]) if fused else 1):
                _install(model, target, param, stack([parts[i] for i in sorted(parts)]), quantize)
                del pending[target]
            continue
        if isinstance(tensor, QuantizedWeight):
            tensor = tensor.dequantize(param.dtype)
        dest = param.data
        if fused is not None:
            sizes = shard_sizes[fused]
            dest = dest.narrow(0, sum(sizes[:shard]), sizes[shard])
        if dest.shape != tensor.shape:
            raise ModelLoadError(f"weight {name} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
        dest.copy_(tensor)

    missing = sorted({p for p, _ in expected - loaded})
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint is missing {len(missing)} weights: {shown}")


def _install(model: nn.Module, target: str, param: nn.Parameter, value: Weight,
             quantize: Callable[[torch.Tensor], QuantizedWeight] | None) -> None:
    if tuple(value.shape) != tuple(param.shape):
        raise ModelLoadError(f"weight {target} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
    module_name, _, attr = target.rpartition(".")
    module = model.get_submodule(module_name)
    if quantize is not None and isinstance(value, torch.Tensor) and isinstance(module, nn.Linear) and attr == "weight":
        value = quantize(value)
    if isinstance(value, QuantizedWeight):
        del module._parameters[attr]
        setattr(module, attr, value)
    else:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
