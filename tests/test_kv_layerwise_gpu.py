"""Layer-wise KV export on a GPU (marked `gpu`; run with TRITON_INTERPRET=0 on the device): a
chunk that streams layer-wise runs eager although a prefill CUDA graph would take it otherwise
(a graph cannot stop between layers), its pieces assemble to the KV the graph's chunk writes
(bf16 and fp8 pools, with their scales), and decode fed those pieces gives the local tokens."""

from __future__ import annotations

import os

import pytest
import torch

from services.engine.outputs import SampledToken, build_output
from services.kv import wire
from services.kv.layerwise import BlockAssembler
from tests.conftest import assert_all_free, make_llm
from tests.test_kv_layerwise import GREEDY, PROMPT, export

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                                  reason="set TRITON_INTERPRET=0 to run GPU tests")]


def assemble(outputs, layers):
    assembler, blocks = BlockAssembler(layers), []
    for _, pieces in outputs:
        for b in pieces:
            block = assembler.add(wire.LayerPiece(b.block_index, b.block_hash, b.layer_start, b.tensor, b.scales))
            if block is not None:
                blocks.append(block)
    assembler.check_complete()
    return blocks


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_layerwise_chunks_run_eager_and_ship_the_kv_a_prefill_graph_writes(kv_cache_dtype):
    prefill = make_llm("tiny-llama", device="cuda", max_num_batched_tokens=40, kv_cache_dtype=kv_cache_dtype)
    decode = make_llm("tiny-llama", device="cuda", kv_cache_dtype=kv_cache_dtype)
    runner = prefill.engine.runner
    assert runner.prefill_graphs is not None
    graph_steps = []
    run_graph = runner._run_prefill_graph
    runner._run_prefill_graph = lambda *a: graph_steps.append(1) or run_graph(*a)
    whole, _, _ = export(prefill, 0, layerwise=False)
    graphed = len(graph_steps)
    assert graphed >= 2  # the 40-token chunks went through the graph
    outputs, prefill_request, layers = export(prefill, 0, layerwise=True)
    assert len(graph_steps) == graphed  # ... and not when they stream layer-wise
    expected = [b for _, blocks in whole for b in blocks]
    got = assemble(outputs, layers)
    assert [(b.block_index, b.block_hash) for b in got] == [(b.block_index, b.block_hash) for b in expected]
    for a, e in zip(got, expected):
        assert torch.allclose(a.tensor.float(), e.tensor.float(), atol=2e-2, rtol=2e-2)
        assert (a.scales is None) == (e.scales is None) and (a.scales is None or torch.equal(a.scales, e.scales))

    local = decode.generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    engine = decode.engine
    engine.block_manager.reset_prefix_cache()  # receive every block
    request = engine.make_request(PROMPT, GREEDY, remote_prefill=True)
    engine.add(request)
    engine.step()
    assert build_output(request, delta=True).kv_pull_from_block == 0
    for block in got:
        engine.receive_kv(request.request_id, block)
    engine.finish_kv(request.request_id, [SampledToken(prefill_request.seqs[0].token_ids[-1], None)],
                     prefill_request.num_cached_tokens)
    while engine.has_unfinished():
        engine.step()
    assert build_output(request, delta=False).outputs[0].token_ids == local
    assert_all_free(decode)
    assert_all_free(prefill)
