"""The KV wire format: raw bytes with dtype, shape and checksum; everything checked on receipt."""

from __future__ import annotations

import pytest
import torch

from services.engine.kv_transfer import BlockData
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
        (lambda m: setattr(m, "layer_end", 1) or m, "partial layer/head ranges"),
    ],
)
def test_malformed_or_corrupt_block_is_rejected(mutate, message):
    msg = wire.encode(BlockData(0, 1, torch.randn(SHAPE)))
    with pytest.raises(wire.KVWireError, match=message):
        wire.decode(mutate(msg), SHAPE, torch.float32)
