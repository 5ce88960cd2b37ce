"""KV blocks as raw bytes on the wire: dtype, shape, hash and an xxh64 checksum, never pickle.

A block travels as [layers, 2 (K, V), num_tokens, kv_heads, head_dim] elements in C order.
The receiver checks everything it can before the bytes touch its cache: dtype and shape
against its own layout, the checksum against the bytes, and (in the decode worker) the block
index and hash against what it allocated for that request.

An fp8 block (float8_e4m3fn, --kv-cache-dtype fp8) also carries its sender's per-tensor
scales, [layers, 2 (K, V)] float32 (kernels/cache.py): a K/V payload of exactly half a bf16
block's bytes, plus 8 bytes a layer in `scales`, by bytes or by reference alike.

Bytes may cover a range of layers (`layer_start`, `layer_end`): a prefill worker that streams
layer-wise ships each block as several pieces, and the receiver assembles them
(services/kv/layerwise.py). KV heads are always whole; references always cover every layer.

On one GPU a block can travel by reference instead (`pool_block`: its slot in the sender's
KV pool, which the receiver has mapped through CUDA IPC, see cuda_ipc.py): the same header and
checks, no bytes and so no checksum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import xxhash

from pdserve.v1 import kv_pb2
from services.engine.kv_transfer import BlockData, BlockRef

# The dtypes KV travels in, by their wire names (KVBlock.dtype, KVPool.dtype).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float8_e4m3fn": torch.float8_e4m3fn}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class KVWireError(ValueError):
    """A received block is malformed or corrupt; the request recomputes locally."""


class PoolError(ValueError):
    """A peer's pool announcement (CUDA IPC's KVPool, NIXL's NixlPool) does not describe a pool
    we can read blocks of our layout from."""


@dataclass(frozen=True)
class LayerPiece:
    """The layers [layer_start, layer_start + tensor.shape[0]) of one block, as received."""

    block_index: int
    block_hash: int | None
    layer_start: int
    tensor: torch.Tensor  # [piece layers, 2 (K, V), num_tokens, kv_heads, head_dim]
    scales: torch.Tensor | None = None  # fp8: [piece layers, 2]

    @property
    def layer_end(self) -> int:
        return self.layer_start + self.tensor.shape[0]


def encode(block: BlockData) -> kv_pb2.KVBlock:
    """`block`'s bytes: every layer, or a layer-wise piece (BlockData.layer_start)."""
    t, layer_start = block.tensor.contiguous(), block.layer_start
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    layers, _, _, heads, _ = t.shape
    msg = kv_pb2.KVBlock(
        block_index=block.block_index,
        num_tokens=t.shape[2],
        layer_start=layer_start,
        layer_end=layer_start + layers,
        head_start=0,
        head_end=heads,
        dtype=DTYPE_NAMES[t.dtype],
        shape=list(t.shape),
        data=data,
        checksum=xxhash.xxh64_intdigest(data),
    )
    if block.block_hash is not None:
        msg.block_hash = block.block_hash
    _put_scales(msg, block.scales)
    return msg


def _put_scales(msg: kv_pb2.KVBlock, scales: torch.Tensor | None) -> None:
    if scales is not None:
        msg.scales.extend(scales.flatten().tolist())


def encode_ref(ref: BlockRef, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               scales: torch.Tensor | None = None) -> kv_pb2.KVBlock:
    """A block shipped by reference: its slot in the sender's pool, no bytes (same-GPU transport)."""
    msg = kv_pb2.KVBlock(
        block_index=ref.block_index,
        num_tokens=ref.num_tokens,
        layer_start=0,
        layer_end=num_layers,
        head_start=0,
        head_end=num_kv_heads,
        dtype=DTYPE_NAMES[dtype],
        shape=[num_layers, 2, ref.num_tokens, num_kv_heads, head_dim],
        pool_block=ref.pool_block,
    )
    if ref.block_hash is not None:
        msg.block_hash = ref.block_hash
    _put_scales(msg, scales)
    return msg


def _check_header(msg: kv_pb2.KVBlock, expected_shape: tuple[int, ...], expected_dtype: torch.dtype,
                  layer_ranges: bool = False) -> tuple[int, ...]:
    """The shape `msg` declares, checked against ours; with `layer_ranges`, for any non-empty
    range of our layers (else every layer)."""
    dtype = DTYPES.get(msg.dtype)
    if dtype is None or dtype != expected_dtype:
        raise KVWireError(f"block {msg.block_index}: dtype {msg.dtype!r}, expected {DTYPE_NAMES[expected_dtype]}")
    layers, kv, block_size, heads, dim = expected_shape
    if (msg.head_start, msg.head_end) != (0, heads):
        raise KVWireError(f"block {msg.block_index}: partial head ranges are not supported yet")
    start, end = msg.layer_start, msg.layer_end
    if (start, end) != (0, layers) and not (layer_ranges and 0 <= start < end <= layers):
        raise KVWireError(f"block {msg.block_index}: layers [{start}, {end}) where "
                          f"{'a range of ' if layer_ranges else ''}[0, {layers}) was expected")
    shape = tuple(msg.shape)
    if not 1 <= msg.num_tokens <= block_size or shape != (end - start, kv, msg.num_tokens, heads, dim):
        raise KVWireError(f"block {msg.block_index}: shape {shape} does not fit {expected_shape}")
    return shape


def _scales(msg: kv_pb2.KVBlock, dtype: torch.dtype, layers: int) -> torch.Tensor | None:
    """An fp8 block's [layers, 2] scales (each finite and positive); None for other dtypes."""
    if dtype != torch.float8_e4m3fn:
        if msg.scales:
            raise KVWireError(f"block {msg.block_index}: scales on a {msg.dtype} block")
        return None
    scales = torch.tensor(list(msg.scales), dtype=torch.float32)
    if scales.numel() != 2 * layers or not bool((torch.isfinite(scales) & (scales > 0)).all()):
        raise KVWireError(f"block {msg.block_index}: an fp8 block needs {2 * layers} finite positive scales, "
                          f"got {scales.numel()}")
    return scales.view(layers, 2)


def decode(msg: kv_pb2.KVBlock, expected_shape: tuple[int, ...], expected_dtype: torch.dtype) -> BlockData:
    """Check and unpack a received block of every layer. `expected_shape` is [layers, 2, block_size, heads, dim]."""
    piece = decode_piece(msg, expected_shape, expected_dtype, layer_ranges=False)
    return BlockData(piece.block_index, piece.block_hash, piece.tensor, piece.scales)


def decode_piece(msg: kv_pb2.KVBlock, expected_shape: tuple[int, ...], expected_dtype: torch.dtype,
                 layer_ranges: bool = True) -> LayerPiece:
    """Check and unpack a received block or a range of its layers (layerwise.BlockAssembler
    puts the pieces together)."""
    if msg.HasField("pool_block"):
        raise KVWireError(f"block {msg.block_index}: a reference where bytes were asked for")
    shape = _check_header(msg, expected_shape, expected_dtype, layer_ranges)
    nbytes = torch.empty((), dtype=expected_dtype).element_size()
    for size in shape:
        nbytes *= size
    if len(msg.data) != nbytes:
        raise KVWireError(f"block {msg.block_index}: {len(msg.data)} bytes, expected {nbytes}")
    if xxhash.xxh64_intdigest(msg.data) != msg.checksum:
        raise KVWireError(f"block {msg.block_index}: checksum mismatch")
    scales = _scales(msg, expected_dtype, shape[0])
    tensor = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(expected_dtype).reshape(shape)
    return LayerPiece(msg.block_index, msg.block_hash if msg.HasField("block_hash") else None, msg.layer_start,
                      tensor, scales)


def decode_ref(msg: kv_pb2.KVBlock, pool: torch.Tensor, expected_shape: tuple[int, ...],
               expected_dtype: torch.dtype) -> BlockData:
    """A block shipped by reference, as a view of its slot in the peer's `pool` (mapped from
    the handshake's KVPool: [layers, 2, num_blocks, block_size, heads, dim]). Nothing is
    copied here; the receiver copies the view into its own cache."""
    if not msg.HasField("pool_block"):
        raise KVWireError(f"block {msg.block_index}: bytes where a reference was asked for")
    shape = _check_header(msg, expected_shape, expected_dtype)
    scales = _scales(msg, expected_dtype, shape[0])
    if not 0 <= msg.pool_block < pool.shape[2]:
        raise KVWireError(f"block {msg.block_index}: pool slot {msg.pool_block} outside [0, {pool.shape[2]})")
    tensor = pool[:, :, msg.pool_block, : msg.num_tokens]
    return BlockData(msg.block_index, msg.block_hash if msg.HasField("block_hash") else None, tensor, scales)


def decode_slot(msg: kv_pb2.KVBlock, num_slots: int, expected_shape: tuple[int, ...],
                expected_dtype: torch.dtype) -> BlockRef:
    """A block shipped by reference into a pool of `num_slots` slots that the receiver reads
    itself (NIXL, services/kv/nixl.py): the checked header (and an fp8 block's scales),
    nothing read yet."""
    if not msg.HasField("pool_block"):
        raise KVWireError(f"block {msg.block_index}: bytes where a reference was asked for")
    shape = _check_header(msg, expected_shape, expected_dtype)
    scales = _scales(msg, expected_dtype, shape[0])
    if not 0 <= msg.pool_block < num_slots:
        raise KVWireError(f"block {msg.block_index}: pool slot {msg.pool_block} outside [0, {num_slots})")
    return BlockRef(msg.block_index, msg.block_hash if msg.HasField("block_hash") else None, msg.num_tokens,
                    msg.pool_block, scales)
