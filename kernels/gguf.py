"""GGUF block dequantization: Q8_0, Q4_0, Q4_1 and Q4_K rows to dense rows.

`dequantize_ref` is plain torch (the CPU path); `dequantize` is the Triton kernel with the same
signature and result; `matmul` is x @ W^T with W's tiles dequantized in registers (GPU decode
steps: the weight is read once, as blocks), whose reference is x @ dequantize_ref(...)^T.

A weight row of K elements is K / block_elements blocks of bytes, laid out as llama.cpp's
ggml-quants.h defines them (little-endian fp16 scales):

    Q8_0  34 B / 32:  d (f16) | 32 x int8 q                       w = d * q
    Q4_0  18 B / 32:  d (f16) | 16 B: element i in byte i % 16,   w = d * (q - 8)
                                  low nibble for i < 16, high for i >= 16
    Q4_1  20 B / 32:  d (f16) | m (f16) | 16 B as Q4_0            w = d * q + m
    Q4_K 144 B / 256: d (f16) | dmin (f16) | 12 B of 6-bit scale and min for 8 sub-blocks
                      of 32 | 128 B: 32-byte chunk c holds sub-block 2c in its low nibbles
                      and 2c + 1 in its high ones     w = d * scale[s] * q - dmin * min[s]

The Q4_K scale and min of sub-block j (bytes s[0..11]):
    j < 4:  scale = s[j] & 63,                         min = s[j + 4] & 63
    j >= 4: scale = (s[j + 4] & 15) | (s[j - 4] >> 6) << 4,  min = (s[j + 4] >> 4) | (s[j] >> 6) << 4
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# kind -> (elements per block, bytes per block)
BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144)}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) little-endian bytes -> (..., 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., 16) bytes -> (..., 32) float32 values 0..15: the low nibbles, then the high ones.
    Written into one float tensor (no uint8 concatenation: the CPU path runs this every step)."""
    out = torch.empty(*qs.shape[:-1], 32, dtype=torch.float32, device=qs.device)
    out[..., :16].copy_(qs & 15)
    out[..., 16:].copy_(qs >> 4)
    return out


def dequantize_ref(blocks: torch.Tensor, kind: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks (R, K / block_elements * block_bytes) uint8 -> (R, K) of `dtype`."""
    n, size = BLOCKS[kind]
    rows = blocks.shape[0]
    b = blocks.view(rows, -1, size)  # (R, blocks, bytes)
    if kind == "Q8_0":  # int8 * float32 promotes in the one pass
        w = torch.mul(b[..., 2:].view(torch.int8), _f16(b[..., :2]))
    elif kind == "Q4_0":
        w = _nibbles(b[..., 2:]).sub_(8).mul_(_f16(b[..., :2]))
    elif kind == "Q4_1":
        w = _nibbles(b[..., 4:]).mul_(_f16(b[..., :2])).add_(_f16(b[..., 2:4]))
    else:
        s = b[..., 4:16]
        s03, s47, s811 = s[..., 0:4], s[..., 4:8], s[..., 8:12]
        scale = torch.cat([s03 & 63, (s811 & 15) | ((s03 >> 6) << 4)], dim=-1).float()  # (R, blocks, 8)
        mins = torch.cat([s47 & 63, (s811 >> 4) | ((s47 >> 6) << 4)], dim=-1).float()
        qs = b[..., 16:].reshape(rows, -1, 4, 1, 32)
        q = torch.cat([qs & 15, qs >> 4], dim=3).reshape(rows, -1, 8, 32).float()  # (R, blocks, sub-block, 32)
        w = _f16(b[..., :2]).unsqueeze(-1) * scale.unsqueeze(-1) * q - (_f16(b[..., 2:4]).unsqueeze(-1)
                                                                        * mins.unsqueeze(-1))
    return w.reshape(rows, -1).to(dtype)


@triton.jit
def _f16_at(ptr, mask):
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequant_tile(row_ptr, e, valid, KIND: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """Elements `e` of the rows starting at `row_ptr` (broadcast together), as float32."""
    if KIND == 3:  # Q4_K: 256 elements per super-block
        blk = row_ptr + (e // 256) * BLOCK_BYTES
        k = e % 256
        sub = k // 32  # 0..7
        q = tl.load(blk + 16 + (k // 64) * 32 + k % 32, mask=valid, other=0).to(tl.int32)
        q = (q >> ((sub % 2) * 4)) & 15
        low = sub < 4
        a = tl.load(blk + 4 + sub, mask=valid, other=0).to(tl.int32)  # s[j]
        b = tl.load(blk + 8 + sub % 4, mask=valid, other=0).to(tl.int32)  # s[j + 4], j < 4
        c = tl.load(blk + 4 + sub + 4, mask=valid & (sub >= 4), other=0).to(tl.int32)  # s[j + 4], j >= 4
        p = tl.load(blk + 4 + sub % 4, mask=valid, other=0).to(tl.int32)  # s[j - 4], j >= 4
        scale = tl.where(low, a & 63, (c & 15) | ((p >> 6) << 4))
        mn = tl.where(low, b & 63, (c >> 4) | ((a >> 6) << 4))
        d = _f16_at(blk, valid)
        dmin = _f16_at(blk + 2, valid)
        w = d * scale.to(tl.float32) * q.to(tl.float32) - dmin * mn.to(tl.float32)
    else:
        blk = row_ptr + (e // 32) * BLOCK_BYTES
        i = e % 32
        d = _f16_at(blk, valid)
        if KIND == 0:  # Q8_0
            q = tl.load(blk + 2 + i, mask=valid, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            w = d * q
        else:
            off = 2 if KIND == 1 else 4
            q = tl.load(blk + off + i % 16, mask=valid, other=0).to(tl.int32)
            q = ((q >> ((i // 16) * 4)) & 15).to(tl.float32)
            if KIND == 1:  # Q4_0
                w = d * (q - 8.0)
            else:  # Q4_1
                w = d * q + _f16_at(blk + 2, valid)
    return w


@triton.jit
def _dequant_kernel(Blocks, Out, stride_b, stride_o, K, KIND: tl.constexpr, BLOCK_BYTES: tl.constexpr,
                    TILE: tl.constexpr):
    row = tl.program_id(0)
    e = tl.program_id(1) * TILE + tl.arange(0, TILE)  # element indices of this row
    valid = e < K
    w = _dequant_tile(Blocks + row * stride_b, e, valid, KIND, BLOCK_BYTES)
    tl.store(Out + row * stride_o + e, w.to(Out.dtype.element_ty), mask=valid)


@triton.jit
def _matmul_kernel(X, Blocks, Out, M, N, K, stride_xm, stride_b, stride_om, KIND: tl.constexpr,
                   BLOCK_BYTES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Out (M, N) = X (M, K) @ W^T, W dequantized one (BLOCK_N, BLOCK_K) tile at a time in
    registers: the weight is read once, as its blocks, and never written out dense."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        valid = (n[:, None] < N) & (k[None, :] < K)
        w = _dequant_tile(Blocks + n[:, None] * stride_b, k[None, :], valid, KIND, BLOCK_BYTES)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(Out + m[:, None] * stride_om + n[None, :], acc.to(Out.dtype.element_ty),
             mask=(m[:, None] < M) & (n[None, :] < N))


_KIND_IDS = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 3}


def dequantize(blocks: torch.Tensor, kind: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Triton kernel; the same contract as `dequantize_ref`."""
    n, size = BLOCKS[kind]
    assert blocks.dtype == torch.uint8 and blocks.dim() == 2 and blocks.stride(1) == 1, "blocks: (R, bytes) uint8"
    assert blocks.shape[1] % size == 0, f"{kind} rows are whole {size}-byte blocks"
    rows, k = blocks.shape[0], blocks.shape[1] // size * n
    out = torch.empty(rows, k, dtype=dtype, device=blocks.device)
    tile = 256
    if rows:
        _dequant_kernel[(rows, triton.cdiv(k, tile))](blocks, out, blocks.stride(0), out.stride(0), k,
                                                       KIND=_KIND_IDS[kind], BLOCK_BYTES=size, TILE=tile)
    return out


def matmul(x: torch.Tensor, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) in x's dtype, W (N, K) given as GGUF blocks (N, bytes): the
    fused kernel. Its reference is `x @ dequantize_ref(blocks, kind, x.dtype).t()`."""
    n, size = BLOCKS[kind]
    assert blocks.dtype == torch.uint8 and blocks.dim() == 2 and blocks.stride(1) == 1, "blocks: (N, bytes) uint8"
    assert x.dim() == 2 and x.stride(1) == 1 and x.shape[1] == blocks.shape[1] // size * n, "x: (M, K), K = W's"
    M, K = x.shape
    N = blocks.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_m = 16
    block_k = 256 if kind == "Q4_K" else 64
    block_n = 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _matmul_kernel[grid](x, blocks, out, M, N, K, x.stride(0), blocks.stride(0), out.stride(0),
                         KIND=_KIND_IDS[kind], BLOCK_BYTES=size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
