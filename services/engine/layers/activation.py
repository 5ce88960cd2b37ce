"""An MLP's activation by its config name, with transformers' maths (ACT2FN).

GPT-2's own is written out here, so that a follower rank (parallel/follower.py) of a GPT-2
or of a SiLU model (the Llama file fuses SiLU and needs none) never imports transformers,
about a second of each rank's start-up; any other name is transformers' own."""

from __future__ import annotations

import math

import torch
from torch import nn


class NewGELU(nn.Module):
    """GELU's tanh approximation exactly as transformers' NewGELUActivation computes it
    (torch's gelu(approximate="tanh") rounds differently)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def activation(name: str) -> nn.Module:
    if name == "gelu_new":
        return NewGELU()
    from transformers.activations import ACT2FN

    return ACT2FN[name]
