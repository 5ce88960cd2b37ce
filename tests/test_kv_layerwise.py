"""Blocks that arrive layer by layer (services/kv/layerwise.py): a block is admitted only
whole, each layer exactly once; anything else is refused before it touches a cache."""

from __future__ import annotations

import pytest
import torch

from services.engine.kv_transfer import BlockData
from services.kv import wire
from services.kv.layerwise import BlockAssembler

SHAPE = (4, 2, 4, 3, 8)  # layers, K/V, block_size, kv_heads, head_dim
FP8 = torch.float8_e4m3fn


def pieces(block: BlockData, ranges: list[tuple[int, int]]) -> list[wire.LayerPiece]:
    """`block` cut into layer ranges, each through the wire and back, as a receiver sees it."""
    out = []
    for start, end in ranges:
        scales = None if block.scales is None else block.scales[start:end]
        msg = wire.encode(BlockData(block.block_index, block.block_hash, block.tensor[start:end], scales), start)
        out.append(wire.decode_piece(msg, SHAPE, block.tensor.dtype))
    return out


def test_a_layer_range_round_trips_and_a_whole_block_decoder_refuses_it():
    tensor = torch.randn(SHAPE)
    msg = wire.encode(BlockData(2, 7, tensor[1:3]), layer_start=1)
    assert (msg.layer_start, msg.layer_end, list(msg.shape)) == (1, 3, [2, 2, 4, 3, 8])
    piece = wire.decode_piece(msg, SHAPE, torch.float32)
    assert (piece.block_index, piece.block_hash, piece.layer_start, piece.layer_end) == (2, 7, 1, 3)
    assert torch.equal(piece.tensor, tensor[1:3])
    with pytest.raises(wire.KVWireError, match=r"layers \[1, 3\) where \[0, 4\) was expected"):
        wire.decode(msg, SHAPE, torch.float32)


@pytest.mark.parametrize("start, end, message", [
    (3, 5, r"layers \[3, 5\) where a range of \[0, 4\)"),  # past our last layer
    (2, 2, r"layers \[2, 2\) where a range of \[0, 4\)"),  # empty
])
def test_a_layer_range_outside_ours_is_refused(start, end, message):
    msg = wire.encode(BlockData(0, 1, torch.randn(SHAPE)[:1]), layer_start=start)
    msg.layer_end = end
    with pytest.raises(wire.KVWireError, match=message):
        wire.decode_piece(msg, SHAPE, torch.float32)


def test_a_layer_range_whose_shape_disagrees_with_it_is_refused():
    msg = wire.encode(BlockData(0, 1, torch.randn(SHAPE)[:2]), layer_start=0)
    msg.layer_end = 3  # claims three layers, carries two
    with pytest.raises(wire.KVWireError, match="does not fit"):
        wire.decode_piece(msg, SHAPE, torch.float32)


def test_blocks_are_handed_out_whole_once_their_last_layer_arrives_in_any_order():
    a, b = BlockData(5, 11, torch.randn(SHAPE)), BlockData(6, None, torch.randn(4, 2, 3, 3, 8))  # b: partial block
    pa, pb = pieces(a, [(0, 1), (1, 2), (2, 3), (3, 4)]), pieces(b, [(2, 4), (0, 2)])
    assembler = BlockAssembler(4)
    got = [assembler.add(p) for p in (pa[3], pb[0], pa[0], pa[2], pb[1], pa[1])]
    assert [g is None for g in got] == [True, True, True, True, False, False]
    assert (got[4].block_index, got[4].block_hash, got[5].block_index, got[5].block_hash) == (6, None, 5, 11)
    assert torch.equal(got[4].tensor, b.tensor) and torch.equal(got[5].tensor, a.tensor)
    assembler.check_complete()


def test_an_fp8_block_is_assembled_with_each_layers_scales():
    scales = torch.tensor([[0.5, 0.25], [1.0, 2.0], [3.0, 4.0], [0.125, 8.0]])
    block = BlockData(0, 3, torch.randn(SHAPE).to(FP8), scales)
    assembler = BlockAssembler(4)
    out = [assembler.add(p) for p in pieces(block, [(1, 4), (0, 1)])]
    assert out[0] is None
    assert torch.equal(out[1].tensor.view(torch.uint8), block.tensor.view(torch.uint8))
    assert torch.equal(out[1].scales, scales)


def test_a_whole_block_is_the_one_piece_case():
    block = BlockData(1, 9, torch.randn(SHAPE))
    (whole,) = pieces(block, [(0, 4)])
    assert torch.equal(BlockAssembler(4).add(whole).tensor, block.tensor)


@pytest.mark.parametrize("ranges, message", [
    ([(0, 2), (1, 2)], r"layers \[1, 2\) received twice"),  # a duplicated layer
    ([(0, 2), (1, 3)], r"layers \[1, 3\) received twice"),  # overlapping ranges
    ([(0, 4), (2, 3)], "after the block was complete"),  # a piece of a block already admitted
    ([(0, 2), (2, 4), (0, 1)], "after the block was complete"),
])
def test_a_duplicated_layer_piece_is_refused(ranges, message):
    assembler = BlockAssembler(4)
    *first, last = pieces(BlockData(3, 1, torch.randn(SHAPE)), ranges)
    for piece in first:
        assembler.add(piece)
    with pytest.raises(wire.KVWireError, match=message):
        assembler.add(last)


def test_a_block_missing_a_layer_when_the_peer_is_done_is_refused():
    assembler = BlockAssembler(4)
    for piece in pieces(BlockData(3, 1, torch.randn(SHAPE)), [(0, 1), (3, 4)]):
        assert assembler.add(piece) is None
    with pytest.raises(wire.KVWireError, match=r"block 3 lacks layers \[1, 2\]"):
        assembler.check_complete()


@pytest.mark.parametrize("other", [
    BlockData(3, 2, torch.randn(SHAPE)),  # another hash
    BlockData(3, 1, torch.randn(4, 2, 2, 3, 8)),  # another token count
])
def test_a_piece_that_disagrees_with_its_blocks_other_pieces_is_refused(other):
    assembler = BlockAssembler(4)
    assembler.add(pieces(BlockData(3, 1, torch.randn(SHAPE)), [(0, 2)])[0])
    with pytest.raises(wire.KVWireError, match="disagrees"):
        assembler.add(pieces(other, [(2, 4)])[0])
