"""Copy an HF-named state dict into a model, fusing shards (q/k/v, gate/up) on the way."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from services.engine.errors import ModelLoadError

# name -> (our parameter name, fused parameter it is a shard of (or None), shard index)
Renamer = Callable[[str], tuple[str, str | None, int]]


@torch.no_grad()
def load_params(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    rename: Renamer,
    shard_sizes: dict[str, list[int]],
    skip: tuple[str, ...] = (),
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Load every parameter exactly once; unknown, misshapen or missing weights are errors."""
    params = dict(model.named_parameters())
    expected = set()
    for pname in params:
        fused = next((f for f in shard_sizes if f".{f}." in pname), None)
        shards = range(len(shard_sizes[fused])) if fused else range(1)
        expected.update((pname, s) for s in shards)

    loaded: set[tuple[str, int]] = set()
    for name, tensor in weights:
        if name.endswith(skip):
            continue
        target, fused, shard = rename(name)
        param = params.get(target)
        if param is None:
            raise ModelLoadError(f"checkpoint has a weight this model does not: {name}")
        if transform is not None:
            tensor = transform(name, tensor)
        dest = param.data
        if fused is not None:
            sizes = shard_sizes[fused]
            dest = dest.narrow(0, sum(sizes[:shard]), sizes[shard])
        if dest.shape != tensor.shape:
            raise ModelLoadError(f"weight {name} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
        dest.copy_(tensor)
        loaded.add((target, shard))

    missing = sorted({p for p, _ in expected - loaded})
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint is missing {len(missing)} weights: {shown}")
