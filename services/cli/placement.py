"""Where each worker of a local stack runs: environment (CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS)
and engine flags (a share of a GPU's memory), added on top of what the whole stack gets.

This module imports neither torch nor redis, so a launcher can plan a layout before it loads
anything heavy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from services.engine.errors import ConfigError


@dataclass(frozen=True)
class Placement:
    """One worker's extra environment, and extra engine flags that go after the stack's model
    flags. In argparse the last value of a flag wins, so these override the model flags."""

    env: Mapping[str, str] = field(default_factory=dict)
    argv: tuple[str, ...] = ()


# (role, index) -> that worker's placement; role is "prefill" or "decode".
PlacementFn = Callable[[str, int], Placement]


def gpu_per_worker(gpus: Sequence[str], num_prefill: int, num_decode: int, ranks: int = 1) -> PlacementFn:
    """Each worker gets `ranks` GPUs to itself (one per tensor-parallel rank), in order: prefill
    workers first, then decode workers. Each worker sees only its own devices, from cuda:0."""
    needed = (num_prefill + num_decode) * ranks
    if needed > len(gpus):
        raise ConfigError(f"{num_prefill} prefill + {num_decode} decode workers of {ranks} rank(s) each need "
                          f"{needed} GPUs, got {len(gpus)} ({','.join(gpus) or 'none'})")

    def place(role: str, index: int) -> Placement:
        slot = index if role == "prefill" else num_prefill + index
        return Placement(env={"CUDA_VISIBLE_DEVICES": ",".join(gpus[slot * ranks : (slot + 1) * ranks])})

    return place


def parse_gpus(text: str) -> list[str]:
    """`0,1,3` -> ["0", "1", "3"] (device ids as CUDA_VISIBLE_DEVICES spells them)."""
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus:
        raise ValueError(f"no GPU ids in {text!r}")
    return gpus
