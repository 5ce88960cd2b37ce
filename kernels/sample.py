"""The random draw of the sampler, one program per row: temperature, the row's threshold
(top_k / top_p, found beforehand), min_p and the inverse-CDF draw in one kernel.

`draw_ref` is the sampler's torch path (services/engine/sampling_ops.draw_full over the
temperature-scaled logits); `draw` is the Triton kernel with the same result: per row,
x = logit / temperature (float32), weights w = exp(x - max x) where x >= threshold and
w >= min_p (0 elsewhere), and the first token, in token-id order, whose running sum of
weights exceeds u * (sum of weights).

Why it exists: on a GPU the torch path is about twenty launches and four float32 passes over
[batch, vocab] (the upcast, the division, exp, the block sums), each launch ~10 us of host
time; at batch 256 of a 128k vocabulary temperature sampling cost 0.60x of greedy's
throughput on an H200 (issue #26). Here the logits are read in their own dtype, three times
(max, total, walk), and nothing is written but the token.

The walk sums the weights in another order than the total, so the target can pass the last
kept token by an ulp: then the last token with a positive weight is drawn, as in the torch
path; a weight of zero is never drawn.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def draw_ref(logits: torch.Tensor, temperature: torch.Tensor, threshold: torch.Tensor | None,
             min_p: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """logits [R, V] (any float dtype), temperature, threshold (x's space), min_p, u: [R] ->
    [R] int64 tokens."""
    from services.engine.sampling_ops import draw_full  # the engine imports this module

    x = logits.float() / temperature[:, None]
    return draw_full(x, threshold, min_p, u)


@triton.jit
def _draw_kernel(X, stride_x, Temp, Thresh, MinP, U, Out, V: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_THRESH: tl.constexpr, HAS_MIN_P: tl.constexpr):
    row = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    t = tl.load(Temp + row)
    thresh = tl.load(Thresh + row) if HAS_THRESH else float("-inf")
    # 1: the row's largest x (the top token is always kept: thresholds never pass it)
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for start in tl.static_range(0, V, BLOCK):
        x = tl.load(X + row * stride_x + start + lanes, mask=start + lanes < V, other=float("-inf")).to(tl.float32)
        best = tl.maximum(best, x / t)
    top = tl.max(best, 0)
    floor = tl.load(MinP + row) if HAS_MIN_P else 0.0
    # 2: the sum of the kept weights
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in tl.static_range(0, V, BLOCK):
        x = tl.load(X + row * stride_x + start + lanes, mask=start + lanes < V, other=float("-inf")).to(tl.float32) / t
        w = tl.exp(x - top)
        acc += tl.where((x >= thresh) & (w >= floor), w, 0.0)
    target = tl.load(U + row) * tl.sum(acc, 0)
    # 3: the first token whose running sum passes the target
    carry = 0.0
    found = V
    last = -1
    for start in tl.static_range(0, V, BLOCK):
        x = tl.load(X + row * stride_x + start + lanes, mask=start + lanes < V, other=float("-inf")).to(tl.float32) / t
        w = tl.exp(x - top)
        w = tl.where((x >= thresh) & (w >= floor), w, 0.0)
        running = carry + tl.cumsum(w, 0)
        found = tl.minimum(found, tl.min(tl.where((running > target) & (w > 0), start + lanes, V), 0))
        last = tl.maximum(last, tl.max(tl.where(w > 0, start + lanes, -1), 0))
        carry += tl.sum(w, 0)
    token = tl.where(found < V, found, tl.maximum(last, 0))
    tl.store(Out + row, token.to(tl.int64))


def draw(logits: torch.Tensor, temperature: torch.Tensor, threshold: torch.Tensor | None,
         min_p: torch.Tensor | None, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `draw_ref`; `out` (int64 [R], may be a view) receives the tokens."""
    assert logits.dim() == 2 and logits.stride(-1) == 1, "logits must be [R, V] with contiguous rows"
    R, V = logits.shape
    assert V < 2**31, "vocabulary too large for int32 indices"
    for name, t in (("temperature", temperature), ("threshold", threshold), ("min_p", min_p), ("u", u)):
        assert t is None or (t.shape == (R,) and t.dtype == torch.float32), f"{name} must be float32 [R]"
    out = torch.empty(R, dtype=torch.long, device=logits.device) if out is None else out
    assert out.shape == (R,) and out.dtype == torch.long, "out must be int64 [R]"
    if R:
        _draw_kernel[(R,)](logits, logits.stride(0), temperature,
                           threshold if threshold is not None else temperature,
                           min_p if min_p is not None else temperature, u, out,
                           V=V, BLOCK=min(4096, triton.next_power_of_2(V)),
                           HAS_THRESH=threshold is not None, HAS_MIN_P=min_p is not None, num_warps=8)
    return out
