"""Blocks that arrive layer by layer (services/kv/layerwise.py): a block is admitted only
whole, each layer exactly once; anything else is refused before it touches a cache."""

from __future__ import annotations

import pytest
import torch

from services.engine import SamplingParams
from services.engine.kv_transfer import BlockData
from services.engine.outputs import SampledToken, build_output
from services.kv import wire
from services.kv.layerwise import BlockAssembler
from tests.conftest import assert_all_free, make_llm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (4, 2, 4, 3, 8)  # layers, K/V, block_size, kv_heads, head_dim
FP8 = torch.float8_e4m3fn


def pieces(block: BlockData, ranges: list[tuple[int, int]]) -> list[wire.LayerPiece]:
    """`block` cut into layer ranges, each through the wire and back, as a receiver sees it."""
    out = []
    for start, end in ranges:
        scales = None if block.scales is None else block.scales[start:end]
        msg = wire.encode(BlockData(block.block_index, block.block_hash, block.tensor[start:end], scales, start))
        out.append(wire.decode_piece(msg, SHAPE, block.tensor.dtype))
    return out


def test_a_layer_range_round_trips_and_a_whole_block_decoder_refuses_it():
    tensor = torch.randn(SHAPE)
    msg = wire.encode(BlockData(2, 7, tensor[1:3], layer_start=1))
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
    msg = wire.encode(BlockData(0, 1, torch.randn(SHAPE)[:1], layer_start=start))
    msg.layer_end = end
    with pytest.raises(wire.KVWireError, match=message):
        wire.decode_piece(msg, SHAPE, torch.float32)


def test_a_layer_range_whose_shape_disagrees_with_it_is_refused():
    msg = wire.encode(BlockData(0, 1, torch.randn(SHAPE)[:2]))
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


# ---- the engine ships layer by layer, mid-step (EngineCore.kv_layer_sink) -------------------

PROMPT = list(range(1000, 1085))  # 85 tokens: 5 full blocks of 16 + a partial block of 5
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def prefill():
    return make_llm("tiny-llama", max_num_batched_tokens=40)  # three chunks: 40 + 40 + 5 tokens


@pytest.fixture(scope="module")
def decode():
    return make_llm("tiny-llama")


def export(llm, skip_blocks, layerwise):
    """Run a prefill-only request; every output handed out, as (layer seen by the sink or None, blocks)."""
    engine, outputs = llm.engine, []
    engine.block_manager.reset_prefix_cache()  # compute every chunk, whatever ran before
    request = engine.make_request(PROMPT, GREEDY, kv_export_from=skip_blocks)
    layers = engine.runner.kv_cache.shape[0] if layerwise else None
    engine.kv_layer_sink = (lambda r: outputs.append(("layer", build_output(r, delta=True).kv_blocks))) if layerwise \
        else None
    try:
        engine.add(request)
        while engine.has_unfinished():
            engine.step()
            outputs.append(("step", build_output(request, delta=True).kv_blocks))
    finally:
        engine.kv_layer_sink = None
    return outputs, request, layers


def test_each_layer_of_a_chunks_blocks_goes_out_before_the_next_layer_runs_and_assembles_to_the_same_kv(prefill):
    whole, _, _ = export(prefill, 1, layerwise=False)
    pieces_out, _, layers = export(prefill, 1, layerwise=True)
    assert layers == 2
    # Mid-step outputs carry one layer each, in layer order; nothing is left for the step's own output.
    per_layer = [[b.layer_start for b in blocks] for kind, blocks in pieces_out if kind == "layer"]
    assert all(not blocks for kind, blocks in pieces_out if kind == "step")
    # tokens 0-39 complete blocks 0-1 (0 skipped), 40-79 blocks 2-4, 80-84 the partial block 5
    indices = [[b.block_index for b in blocks] for kind, blocks in pieces_out if kind == "layer"]
    assert indices == [[1], [1], [2, 3, 4], [2, 3, 4], [5], [5]]
    assert per_layer == [[0], [1], [0, 0, 0], [1, 1, 1], [0], [1]]
    assembler = BlockAssembler(layers)
    assembled = []
    for _, blocks in pieces_out:
        for b in blocks:
            layers_, kv, _, block_size, heads, dim = prefill.engine.runner.kv_cache.shape
            piece = wire.decode_piece(wire.encode(b), (layers_, kv, block_size, heads, dim), b.tensor.dtype)
            block = assembler.add(piece)
            if block is not None:
                assembled.append(block)
    assembler.check_complete()
    expected = [b for _, blocks in whole for b in blocks]
    assert [(b.block_index, b.block_hash) for b in assembled] == [(b.block_index, b.block_hash) for b in expected]
    assert all(torch.equal(a.tensor, e.tensor) for a, e in zip(assembled, expected))
    assert_all_free(prefill)


def test_layerwise_shipped_kv_gives_decode_the_local_tokens_and_frees_every_block(prefill, decode):
    expected = decode.generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    engine = decode.engine
    request = engine.make_request(PROMPT, GREEDY, remote_prefill=True)
    engine.add(request)
    engine.step()
    skip = build_output(request, delta=True).kv_pull_from_block
    outputs, prefill_request, layers = export(prefill, skip, layerwise=True)
    assembler = BlockAssembler(layers)
    for _, blocks in outputs:
        for b in blocks:
            block = assembler.add(wire.LayerPiece(b.block_index, b.block_hash, b.layer_start, b.tensor, b.scales))
            if block is not None:
                engine.receive_kv(request.request_id, block)
    assembler.check_complete()
    first = [SampledToken(s.token_ids[-1], None) for s in prefill_request.seqs]
    engine.finish_kv(request.request_id, first, prefill_request.num_cached_tokens)
    while engine.has_unfinished():
        engine.step()
    assert build_output(request, delta=False).outputs[0].token_ids == expected
    assert request.kv_import.computed_locally == 0
    assert_all_free(decode)
    assert_all_free(prefill)
