"""KV blocks as raw bytes on the wire: dtype, shape, hash and an xxh64 checksum, never pickle.

A block travels as [layers, 2 (K, V), num_tokens, kv_heads, head_dim] elements in C order.
The receiver checks everything it can before the bytes touch its cache: dtype and shape
against its own layout, the checksum against the bytes, and (in the decode worker) the block
index and hash against what it allocated for that request.
"""

from __future__ import annotations

import torch
import xxhash

from pdserve.v1 import kv_pb2
from services.engine.kv_transfer import BlockData

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAMES = {v: k for k, v in _DTYPES.items()}


class KVWireError(ValueError):
    """A received block is malformed or corrupt; the request recomputes locally."""


def encode(block: BlockData) -> kv_pb2.KVBlock:
    t = block.tensor.contiguous()
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    layers, _, _, heads, _ = t.shape
    msg = kv_pb2.KVBlock(
        block_index=block.block_index,
        num_tokens=t.shape[2],
        layer_start=0,
        layer_end=layers,
        head_start=0,
        head_end=heads,
        dtype=_NAMES[t.dtype],
        shape=list(t.shape),
        data=data,
        checksum=xxhash.xxh64_intdigest(data),
    )
    if block.block_hash is not None:
        msg.block_hash = block.block_hash
    return msg


def decode(msg: kv_pb2.KVBlock, expected_shape: tuple[int, ...], expected_dtype: torch.dtype) -> BlockData:
    """Check and unpack a received block. `expected_shape` is [layers, 2, block_size, heads, dim]."""
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None or dtype != expected_dtype:
        raise KVWireError(f"block {msg.block_index}: dtype {msg.dtype!r}, expected {_NAMES[expected_dtype]}")
    layers, kv, block_size, heads, dim = expected_shape
    shape = tuple(msg.shape)
    if not 1 <= msg.num_tokens <= block_size or shape != (layers, kv, msg.num_tokens, heads, dim):
        raise KVWireError(f"block {msg.block_index}: shape {shape} does not fit {expected_shape}")
    if (msg.layer_start, msg.layer_end, msg.head_start, msg.head_end) != (0, layers, 0, heads):
        raise KVWireError(f"block {msg.block_index}: partial layer/head ranges are not supported yet")
    nbytes = torch.empty((), dtype=dtype).element_size()
    for size in shape:
        nbytes *= size
    if len(msg.data) != nbytes:
        raise KVWireError(f"block {msg.block_index}: {len(msg.data)} bytes, expected {nbytes}")
    if xxhash.xxh64_intdigest(msg.data) != msg.checksum:
        raise KVWireError(f"block {msg.block_index}: checksum mismatch")
    tensor = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dtype).reshape(shape)
    return BlockData(msg.block_index, msg.block_hash if msg.HasField("block_hash") else None, tensor)
