"""The sampler's GPU kernels: the random draw (temperature, the row's top_k / top_p threshold,
min_p and the inverse-CDF draw, in two launches), the kept mass that top_p divides by, and
the rows' k largest logits that top_k's threshold comes from.

`draw_ref` is the sampler's torch path (services/engine/sampling_ops.draw_full over the
temperature-scaled logits); `draw` is the Triton kernel with the same result: per row,
x = logit / temperature (float32), weights w = exp(x - max x) where x >= threshold and
w >= min_p (0 elsewhere), and the first token, in token-id order, whose running sum of
weights exceeds u * (sum of weights).

Why it exists: on a GPU the torch path is about twenty launches and four float32 passes over
[batch, vocab] (the upcast, the division, exp, the block sums), each launch ~10 us of host
time; at batch 256 of a 128k vocabulary temperature sampling cost 0.60x of greedy's
throughput on an H200 (issue #26). Here the logits are read in their own dtype and nothing
is written but the token and two floats per chunk, in two launches:

    _chunk_kernel  one program per (row, CHUNK of the vocabulary): the chunk's largest x and
                   the sum of its kept weights relative to it (one read of the logits)
    _walk_kernel   one program per row: the row's max and total from its chunks, the chunk
                   the target falls in, then the walk through that chunk alone

Splitting rows into chunks keeps every SM busy at batch 1 as at batch 256. min_p needs the
row's max before any weight is kept: it costs a third launch (the rows' max, by torch).

The walk sums the weights in another order than the chunks' totals, so the target can pass
the chunk's last kept token by an ulp: then that token is drawn, as the torch path draws the
last positive weight; a weight of zero is never drawn.
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


CHUNK = 2048


@triton.jit
def _chunk_kernel(X, stride_x, Temp, Thresh, Top, MinP, Stats, V: tl.constexpr, S: tl.constexpr,
                  CHUNK: tl.constexpr, HAS_THRESH: tl.constexpr, HAS_MIN_P: tl.constexpr):
    row, chunk = tl.program_id(0), tl.program_id(1)
    at = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(X + row * stride_x + at, mask=at < V, other=float("-inf")).to(tl.float32) / tl.load(Temp + row)
    kept = x > float("-inf")
    if HAS_THRESH:
        kept &= x >= tl.load(Thresh + row)
    if HAS_MIN_P:  # the row's top (Top, already divided) is known: w = exp(x - top) >= min_p
        kept &= tl.exp(x - tl.load(Top + row)) >= tl.load(MinP + row)
    x = tl.where(kept, x, float("-inf"))
    m = tl.max(x, 0)
    total = tl.sum(tl.where(kept, tl.exp(x - tl.where(m > float("-inf"), m, 0.0)), 0.0), 0)
    tl.store(Stats + (row * S + chunk) * 2, m)
    tl.store(Stats + (row * S + chunk) * 2 + 1, total)


@triton.jit
def _walk_kernel(X, stride_x, Temp, Thresh, Top, MinP, Stats, U, Out, V: tl.constexpr, S: tl.constexpr,
                 S_POW2: tl.constexpr, CHUNK: tl.constexpr, HAS_THRESH: tl.constexpr, HAS_MIN_P: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, S_POW2)
    m = tl.load(Stats + (row * S + c) * 2, mask=c < S, other=float("-inf"))
    top = tl.max(m, 0)
    sums = tl.where(m > float("-inf"), tl.load(Stats + (row * S + c) * 2 + 1, mask=c < S, other=0.0) * tl.exp(m - top),
                    0.0)
    target = tl.load(U + row) * tl.sum(sums, 0)
    running = tl.cumsum(sums, 0)
    # the first chunk whose running total passes the target (else the last that weighs anything)
    chunk = tl.min(tl.where((running > target) & (sums > 0), c, S_POW2), 0)
    chunk = tl.where(chunk < S_POW2, chunk, tl.max(tl.where(sums > 0, c, 0), 0))
    carry = tl.sum(tl.where(c < chunk, sums, 0.0), 0)
    at = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(X + row * stride_x + at, mask=at < V, other=float("-inf")).to(tl.float32) / tl.load(Temp + row)
    w = tl.exp(x - top)
    kept = x > float("-inf")
    if HAS_THRESH:
        kept &= x >= tl.load(Thresh + row)
    if HAS_MIN_P:
        kept &= tl.exp(x - tl.load(Top + row)) >= tl.load(MinP + row)
    w = tl.where(kept, w, 0.0)
    found = tl.min(tl.where((carry + tl.cumsum(w, 0) > target) & (w > 0), at, V), 0)
    last = tl.max(tl.where(w > 0, at, -1), 0)
    token = tl.where(found < V, found, tl.maximum(last, 0))
    tl.store(Out + row, token.to(tl.int64))


def _chunk_stats(logits: torch.Tensor, temperature: torch.Tensor, threshold: torch.Tensor | None,
                 min_p: torch.Tensor | None, top: torch.Tensor | None) -> tuple[torch.Tensor, tuple, dict, int]:
    """Launch _chunk_kernel; returns its stats, the walk's arguments and flags, and the chunk."""
    R, V = logits.shape
    # one float per row, read at row: views of wider tensors (a column of candidates) are copied
    temperature, threshold, min_p, top = (None if t is None else t.contiguous()
                                          for t in (temperature, threshold, min_p, top))
    chunk = min(CHUNK, triton.next_power_of_2(V))
    S = triton.cdiv(V, chunk)
    stats = torch.empty(R, S, 2, dtype=torch.float32, device=logits.device)
    if min_p is not None and top is None:
        # the max of x = logit / T is the max logit / T: division by T > 0 keeps the order, rounding too
        top = logits.amax(dim=-1).float() / temperature
    flags = dict(HAS_THRESH=threshold is not None, HAS_MIN_P=min_p is not None)
    args = (logits, logits.stride(0), temperature, threshold if threshold is not None else temperature,
            top if top is not None else temperature, min_p if min_p is not None else temperature, stats)
    _chunk_kernel[(R, S)](*args, V=V, S=S, CHUNK=chunk, num_warps=4, **flags)
    return stats, args, flags, chunk


def kept_mass(logits: torch.Tensor, temperature: torch.Tensor, threshold: torch.Tensor | None,
              min_p: torch.Tensor | None, top: torch.Tensor) -> torch.Tensor:
    """[R]: each row's sum of kept weights exp(x - top), `top` its largest x (float32 [R]):
    top_p's denominator over the whole row, from one read of the logits in their own dtype."""
    stats, *_ = _chunk_stats(logits, temperature, threshold, min_p, top)
    m, sums = stats.unbind(-1)
    return torch.where(m > float("-inf"), sums * torch.exp(m - top[:, None]), 0.0).sum(dim=-1)


def draw(logits: torch.Tensor, temperature: torch.Tensor, threshold: torch.Tensor | None,
         min_p: torch.Tensor | None, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `draw_ref`; `out` (int64 [R], may be a view) receives the tokens."""
    assert logits.dim() == 2 and logits.stride(-1) == 1, "logits must be [R, V] with contiguous rows"
    R, V = logits.shape
    assert V < 2**31, "vocabulary too large for int32 indices"
    for name, t in (("temperature", temperature), ("threshold", threshold), ("min_p", min_p), ("u", u)):
        assert t is None or (t.shape == (R,) and t.dtype == torch.float32), f"{name} must be float32 [R]"
    out = torch.empty(R, dtype=torch.long, device=logits.device) if out is None else out
    assert out.shape == (R,) and out.dtype == torch.long and out.stride(0) == 1, "out must be int64 [R], stride 1"
    if not R:
        return out
    u = u.contiguous()
    stats, args, flags, chunk = _chunk_stats(logits, temperature, threshold, min_p, None)
    S = stats.shape[1]
    _walk_kernel[(R,)](*args, u, out, V=V, S=S, S_POW2=triton.next_power_of_2(S), CHUNK=chunk, num_warps=4,
                       **flags)
    return out


TOPK_CHUNK = 1024
MAX_CHUNKED_K = 256  # larger top_k: torch.topk over the whole row


@triton.jit
def _chunk_top_kernel(X, stride_x, Out, V: tl.constexpr, S: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr):
    row, chunk = tl.program_id(0), tl.program_id(1)
    at = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(X + row * stride_x + at, mask=at < V, other=float("-inf")).to(tl.float32)
    top = tl.sort(x, descending=True)
    lanes = tl.arange(0, CHUNK)
    tl.store(Out + (row * S + chunk) * K + lanes, top, mask=lanes < K)


def top_values(logits: torch.Tensor, k: int, chunk: int | None = None) -> torch.Tensor:
    """[R, k] float32: each row's k largest logits, descending (ties repeated), as
    torch.topk(logits, k).values. Each chunk of TOPK_CHUNK tokens (or `chunk`, a power of two)
    sorts itself and keeps its k largest
    (the row's k largest are among them), then torch.topk picks from those S * k values: a
    radix select over the whole 128k-token row is the slowest part of a top_k step on a GPU."""
    R, V = logits.shape
    assert logits.dim() == 2 and logits.stride(-1) == 1, "logits must be [R, V] with contiguous rows"
    chunk = min(chunk or TOPK_CHUNK, triton.next_power_of_2(V))
    if k > MAX_CHUNKED_K or k > chunk:
        return torch.topk(logits, k, dim=-1).values.float()
    K = triton.next_power_of_2(k)
    S = triton.cdiv(V, chunk)
    candidates = torch.empty(R, S * K, dtype=torch.float32, device=logits.device)
    if R:
        _chunk_top_kernel[(R, S)](logits, logits.stride(0), candidates, V=V, S=S, CHUNK=chunk, K=K, num_warps=4)
    return torch.topk(candidates, k, dim=-1).values

