"""The KV wire format: raw bytes with dtype, shape and checksum; everything checked on receipt."""

from __future__ import annotations

import pytest
import torch

from services.engine.kv_transfer import BlockData, BlockRef
from services.kv import wire

SHAPE = (2, 2, 4, 3, 8)  # layers, K/V, block_size, kv_heads, head_dim


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_block_round_trips_bit_exactly(dtype):
    tensor = torch.randn(SHAPE).to(dtype)
    msg = wire.encode(BlockData(3, 0xDEADBEEF, tensor))
    assert (msg.block_index, msg.block_hash, msg.num_tokens, msg.dtype) == (3, 0xDEADBEEF, 4, str(dtype)[6:])
    assert list(msg.shape) == list(SHAPE) and len(msg.data) == tensor.numel() * tensor.element_size()
    back = wire.decode(msg, SHAPE, dtype)
    assert back.block_index == 3 and back.block_hash == 0xDEADBEEF
    assert torch.equal(back.tensor.view(torch.uint8), tensor.contiguous().view(torch.uint8))


def test_partial_block_has_no_hash_and_fewer_tokens():
    tensor = torch.randn(2, 2, 1, 3, 8)
    msg = wire.encode(BlockData(7, None, tensor))
    assert not msg.HasField("block_hash") and msg.num_tokens == 1
    assert wire.decode(msg, SHAPE, torch.float32).block_hash is None


def corrupt(msg):
    data = bytearray(msg.data)
    data[5] ^= 0x01
    msg.data = bytes(data)
    return msg


@pytest.mark.parametrize(
    "mutate, message",
    [
        (corrupt, "checksum mismatch"),
        (lambda m: (m.ClearField("shape"), m.shape.extend([2, 2, 4, 3, 4]))[-1] or m, "does not fit"),
        (lambda m: setattr(m, "dtype", "float16") or m, "dtype"),
        (lambda m: setattr(m, "dtype", "pickle") or m, "dtype"),
        (lambda m: setattr(m, "num_tokens", 9) or m, "does not fit"),
        (lambda m: setattr(m, "data", m.data[:-4]) or m, "bytes, expected"),
        (lambda m: setattr(m, "head_end", 2) or m, "partial head ranges"),
        (lambda m: setattr(m, "layer_end", 1) or m, r"layers \[0, 1\) where \[0, 2\) was expected"),
    ],
)
def test_malformed_or_corrupt_block_is_rejected(mutate, message):
    msg = wire.encode(BlockData(0, 1, torch.randn(SHAPE)))
    with pytest.raises(wire.KVWireError, match=message):
        wire.decode(mutate(msg), SHAPE, torch.float32)


# ---- by reference (same GPU; services/kv/cuda_ipc.py) ---------------------------------------

POOL = torch.randn(2, 2, 10, 4, 3, 8)  # layers, K/V, num_blocks, block_size, kv_heads, head_dim


def test_a_reference_carries_no_bytes_and_reads_as_a_view_of_the_pool():
    msg = wire.encode_ref(BlockRef(2, 99, 3, pool_block=7), 2, 3, 8, torch.float32)
    assert msg.pool_block == 7 and not msg.data and list(msg.shape) == [2, 2, 3, 3, 8]
    block = wire.decode_ref(msg, POOL, SHAPE, torch.float32)
    assert (block.block_index, block.block_hash, block.num_tokens) == (2, 99, 3)
    assert block.tensor.data_ptr() == POOL[:, :, 7].data_ptr()  # a view: nothing copied yet
    assert torch.equal(block.tensor, POOL[:, :, 7, :3])


@pytest.mark.parametrize("mutate, message", [
    (lambda m: setattr(m, "pool_block", 10), "outside"),
    (lambda m: setattr(m, "dtype", "float16"), "dtype"),
    (lambda m: setattr(m, "num_tokens", 5), "shape"),
    (lambda m: m.ClearField("pool_block"), "bytes where a reference"),
])
def test_a_bad_reference_is_rejected(mutate, message):
    msg = wire.encode_ref(BlockRef(0, None, 4, pool_block=1), 2, 3, 8, torch.float32)
    mutate(msg)
    with pytest.raises(wire.KVWireError, match=message):
        wire.decode_ref(msg, POOL, SHAPE, torch.float32)


def test_bytes_decoding_refuses_a_reference():
    msg = wire.encode_ref(BlockRef(0, None, 4, pool_block=1), 2, 3, 8, torch.float32)
    with pytest.raises(wire.KVWireError, match="reference where bytes"):
        wire.decode(msg, SHAPE, torch.float32)


def pool_msg(**changes):
    from pdserve.v1 import kv_pb2

    fields = dict(dtype="float32", shape=list(POOL.shape), stride=list(POOL.stride()),
                  storage_bytes=POOL.numel() * 4) | changes
    return kv_pb2.KVPool(**fields)


@pytest.mark.parametrize("changes, message", [
    (dict(dtype="bfloat16"), "dtype"),
    (dict(shape=[2, 2, 10, 8, 3, 8]), "does not hold"),
    (dict(shape=[2, 2, 10, 4, 3]), "does not hold"),
    (dict(storage_bytes=POOL.numel() * 4 - 1), "overruns"),
    (dict(stride=[3840, 960, 96, 24, 8, 1]), "overruns"),  # layer stride doubled: past the storage
])
def test_a_pool_that_does_not_fit_our_layout_is_refused(changes, message):
    from services.kv.cuda_ipc import PoolError, check_pool

    check_pool(pool_msg(), SHAPE, torch.float32)  # the pool as exported is fine
    with pytest.raises(PoolError, match=message):
        check_pool(pool_msg(**changes), SHAPE, torch.float32)


def test_a_cpu_pool_is_not_exported():
    from services.kv.cuda_ipc import export_pool

    assert export_pool(POOL) is None
