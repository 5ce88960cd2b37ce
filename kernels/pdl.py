"""Programmatic dependent launch (PDL, Hopper and newer): a kernel launched with it may start
while the kernel before it in the stream is still running, and waits inside, at
`griddepcontrol.wait`, until that kernel has finished and its writes are visible.

What it buys: at batch 1 a decode step is ~200 small kernels of 2-6 us each, and the launch
of each one (grid setup, the first loads) no longer waits behind the previous one's tail.
The GEMV also reads its weights before waiting (never written by the kernels before it),
and decode attention its first K/V tile but the newest token, with the lengths and block
tables (written by the host before the step's first kernel, and by earlier steps). On an H200 (BENCHMARKS.md): batch-1 decode 0.77x (SmolLM2-135M
shape) and 0.95x (Llama-3.2-1B) of the time without, offline throughput 1.34x and 1.04x.

The rule for every kernel launched with it (all of them call `wait_then_release` before
reading anything an earlier kernel of the step writes, and write nothing before it): after the
wait, every earlier kernel in the stream has finished, since each one waited in turn for
its own predecessor; so no read or write after the wait can race with them. The release
lets the next kernel launch early; it orders nothing by itself. Kernels launched without
PDL (torch's, cuBLAS's) keep plain stream order on both sides. CUDA graphs capture the
launches as programmatic edges.

On by default on Hopper and newer; PDSERVE_PDL=0 turns it off (read at each launch, so an
engine built after setting it captures its graphs without).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("PDSERVE_PDL", "1") != "0"
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter has no grid dependency control: there the wait and release are no-ops, so
# that tests can run the kernels' PDL paths (their early reads) on the CPU with USE_PDL set.
_GDC: tl.constexpr = tl.constexpr(not _INTERPRETED)


@functools.cache
def _capable(index: int) -> bool:
    return not _INTERPRETED and torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    return ENABLED and device.type == "cuda" and _capable(device.index if device.index is not None
                                                           else torch.cuda.current_device())


def launch_options(use: bool) -> dict:
    """Extra launch options for a kernel whose USE_PDL constexpr is `use`."""
    return {"launch_pdl": True} if use else {}


@triton.jit
def wait_then_release(USE_PDL: tl.constexpr):
    """Wait for the kernel before (and so for every earlier one), then let the next launch."""
    if USE_PDL and _GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
