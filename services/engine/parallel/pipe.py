"""Pipeline parallelism: the decoder layers split into stages, activations passed per step.

    stage 0: embed -> layers [0, L/P) --send--> stage 1: layers [L/P, 2L/P) --send--> ...
    stage 0: final norm -> logits -> sample  <--send-- last stage: layers [(P-1)L/P, L)

Stage 0 holds the embedding, the final norm and the LM head as well as its layers, so the
engine core (rank 0) samples where it schedules and nothing but one (tokens, hidden) tensor
crosses between stages. What crosses is the residual stream itself (Llama: x + residual, the
next norm's input), so every stage starts as the first layer does. Each TP rank of a stage
exchanges with the same TP rank of the next (activations are whole on every TP rank).
Steps run one after another: stages do not yet overlap consecutive steps.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from services.engine.errors import ConfigError
from services.engine.parallel.group import Layout, Group

_LAYER = re.compile(r"(^|\.)(layers|h)\.(\d+)\.")


def stage_layers(num_layers: int, layout: Layout) -> range:
    """The (global) layers of `layout`'s stage: an equal share each."""
    if num_layers % layout.pp:
        raise ConfigError(f"pipeline_parallel_size {layout.pp} does not divide the model's {num_layers} layers")
    per = num_layers // layout.pp
    return range(layout.stage * per, (layout.stage + 1) * per)


@dataclass
class Pipe:
    world: Group
    layout: Layout

    @property
    def first(self) -> bool:
        return self.layout.stage == 0

    def layers(self, num_layers: int) -> range:
        """The (global) layers this stage holds."""
        return stage_layers(num_layers, self.layout)

    def send_next(self, h: torch.Tensor) -> None:
        """To the next stage (from the last: back to stage 0)."""
        lay = self.layout
        self.world.send(h, (lay.stage + 1) % lay.pp * lay.tp + lay.tp_rank)

    def recv_prev(self, tokens: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
        lay = self.layout
        out = torch.empty(tokens, hidden, dtype=dtype, device=self.world.device)
        return self.world.recv(out, (lay.stage - 1) % lay.pp * lay.tp + lay.tp_rank)

    def stage_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                      num_layers: int) -> Iterator[tuple[str, torch.Tensor]]:
        """This stage's checkpoint tensors, layer indices renumbered from 0; everything outside
        the layers (embeddings, final norm, LM head) is stage 0's."""
        held = self.layers(num_layers)
        for name, tensor in weights:
            m = _LAYER.search(name)
            if m is None:
                if self.first:
                    yield name, tensor
            elif int(m.group(3)) in held:
                yield name[: m.start(3)] + str(int(m.group(3)) - held.start) + name[m.end(3):], tensor
