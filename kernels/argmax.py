"""Row-wise argmax of the logits: the greedy token of each row, written to an int64 output.

`argmax_ref` is torch.argmax (the CPU path); `argmax` is the Triton kernel with the same
result, the first index of the maximum, with NaN counted as the largest value.

Why it exists: at batch 1 a decode step's argmax over a 49,152-wide row ran as torch's
cross-block reduction, 13.9 us on an H200, next to a 15.5 us lm_head (BENCHMARKS.md). Here one
program takes a row: each lane keeps the best value it has seen and its index, over tiles
unrolled at compile time (the vocabulary size is a compile-time constant), so that all of a
row's loads can be in flight at once; then the lanes are reduced, the smallest index among
the lanes that hold the maximum winning.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def argmax_ref(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> [B] int64."""
    return torch.argmax(logits, dim=-1, out=out)


@triton.jit
def _argmax_kernel(X, Out, stride_x, V: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_at = tl.zeros([BLOCK], dtype=tl.int32)
    for start in tl.static_range(0, V, BLOCK):
        x = tl.load(X + row * stride_x + start + lanes, mask=start + lanes < V, other=float("-inf")).to(tl.float32)
        x = tl.where(x != x, float("inf"), x)  # NaN ranks above every number, as in torch
        # strictly greater: on a tie a lane keeps its earlier index; a lane never set keeps
        # index 0 at -inf, which only wins (index 0) when the whole row is -inf
        take = x > best
        best = tl.where(take, x, best)
        best_at = tl.where(take, start + lanes, best_at)
    top = tl.max(best, 0)
    tl.store(Out + row, tl.min(tl.where(best == top, best_at, V), 0).to(tl.int64))


def argmax(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `argmax_ref`; `out` (int64 [B], may be a view) receives the tokens."""
    assert logits.dim() == 2 and logits.stride(-1) == 1, "logits must be [B, V] with contiguous rows"
    B, V = logits.shape
    assert V < 2**31, "vocabulary too large for int32 indices"
    out = torch.empty(B, dtype=torch.long, device=logits.device) if out is None else out
    assert out.shape == (B,) and out.dtype == torch.long, "out must be int64 [B]"
    if B:
        _argmax_kernel[(B,)](logits, out, logits.stride(0), V=V, BLOCK=min(8192, triton.next_power_of_2(V)),
                             num_warps=8)
    return out
