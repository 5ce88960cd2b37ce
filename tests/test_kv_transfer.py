"""KV transfer between two engines in one process (no gRPC): the prefill engine ships the
prompt's blocks, the decode engine writes them into its cache and continues. The tokens
must equal a purely local run, and decode must compute no prompt token."""

from __future__ import annotations

import pytest
import torch

from services.engine import SamplingParams
from services.engine.kv_transfer import BlockData, BlockRef
from services.engine.outputs import SampledToken, build_output
from tests.conftest import assert_all_free, make_llm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = list(range(1000, 1037))  # 37 tokens: 2 full blocks of 16 + a partial block of 5


@pytest.fixture(scope="module")
def prefill():
    return make_llm("tiny-llama")


@pytest.fixture(scope="module")
def decode():
    return make_llm("tiny-llama")


def count_computed(llm) -> list[int]:
    """Record how many tokens each step of `llm` computes."""
    counts: list[int] = []
    execute = llm.engine.runner.execute
    llm.engine.runner.execute = lambda plan, *hook: counts.append(plan.num_tokens) or execute(plan, *hook)
    return counts


def run_prefill(prefill, prompt, params, skip_blocks, by_reference=False):
    engine = prefill.engine
    request = engine.make_request(prompt, params, kv_export_from=skip_blocks, kv_by_reference=by_reference)
    engine.add(request)
    blocks: list[BlockData] = []
    while engine.has_unfinished():
        engine.step()
        blocks += build_output(request, delta=True).kv_blocks
    first = [SampledToken(s.token_ids[-1], s.logprobs[-1] if s.logprobs else None) for s in request.seqs]
    return blocks, first, request


def disaggregated(prefill, decode, prompt, params, tamper=None):
    """Decode admits for remote prefill, prefill ships, decode finishes the request."""
    engine = decode.engine
    request = engine.make_request(prompt, params, remote_prefill=True)
    engine.add(request)
    assert engine.step() == [request]  # allocated: announces the pull, computes nothing
    skip = build_output(request, delta=True).kv_pull_from_block
    assert skip == request.kv_import.num_cached_blocks
    blocks, first, prefill_request = run_prefill(prefill, prompt, params, skip)
    if tamper:
        blocks, first = tamper(blocks, first)
    for block in blocks:
        engine.receive_kv(request.request_id, block)
    engine.finish_kv(request.request_id, first, prefill_request.num_cached_tokens)
    while engine.has_unfinished():
        engine.step()
    return build_output(request, delta=False), request, blocks


def local(llm, prompt, params):
    return llm.generate(prompt, params)[0]


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_remote_prefill_gives_the_local_tokens_and_decode_computes_no_prompt_token(prefill, decode):
    expected = local(prefill, PROMPT, GREEDY)
    computed = count_computed(decode)
    out, request, blocks = disaggregated(prefill, decode, PROMPT, GREEDY)
    assert out.outputs[0].token_ids == expected.outputs[0].token_ids
    assert [b.block_index for b in blocks] == [0, 1, 2]
    assert [b.num_tokens for b in blocks] == [16, 16, 5]
    assert blocks[2].block_hash is None and blocks[0].block_hash is not None
    # Decode computed one token per step after the first (sampled by prefill): 11 decode steps.
    assert computed == [1] * 11
    assert request.kv_import.state == "done" and request.kv_import.computed_locally == 0
    assert_all_free(prefill)
    assert_all_free(decode)


def test_blocks_decode_already_caches_are_not_shipped(prefill, decode):
    decode.engine.block_manager.reset_prefix_cache()
    local(decode, PROMPT, GREEDY)  # decode now caches the 2 full blocks
    out, request, blocks = disaggregated(prefill, decode, PROMPT, GREEDY)
    assert request.kv_import.num_cached_blocks == 2
    assert [b.block_index for b in blocks] == [2]
    assert out.outputs[0].token_ids == local(prefill, PROMPT, GREEDY).outputs[0].token_ids
    assert_all_free(decode)


def test_seeded_n2_sampling_matches_the_local_run(prefill, decode):
    params = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True, logprobs=2)
    expected = local(prefill, PROMPT[:21], params)
    out, _, _ = disaggregated(prefill, decode, PROMPT[:21], params)
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in expected.outputs]
    assert out.outputs[1].logprobs[0].keys() == expected.outputs[1].logprobs[0].keys()
    assert_all_free(decode)


def test_decode_really_uses_the_shipped_kv(prefill, decode):
    decode.engine.block_manager.reset_prefix_cache()

    def perturb(blocks, first):
        g = torch.Generator().manual_seed(0)
        for block in blocks:  # replace K of every layer with large noise; V stays
            block.tensor[:, 0] = torch.randn(block.tensor[:, 0].shape, generator=g) * 10
        return blocks, first

    out, _, _ = disaggregated(prefill, decode, PROMPT, GREEDY, tamper=perturb)
    assert out.outputs[0].token_ids != local(prefill, PROMPT, GREEDY).outputs[0].token_ids
    decode.engine.block_manager.reset_prefix_cache()  # drop the perturbed blocks
    assert_all_free(decode)


@pytest.mark.parametrize(
    "name, tamper",
    [
        ("missing block", lambda b, f: (b[:1] + b[2:], f)),
        ("wrong hash", lambda b, f: ([BlockData(0, 123, b[0].tensor)] + b[1:], f)),
        ("index out of range", lambda b, f: (b + [BlockData(9, None, b[2].tensor)], f)),
        ("wrong token count", lambda b, f: (b[:2] + [BlockData(2, None, b[1].tensor)], f)),
        ("no first token", lambda b, f: (b, [])),
    ],
)
def test_a_broken_transfer_falls_back_to_local_prefill_with_the_same_tokens(prefill, decode, name, tamper):
    decode.engine.block_manager.reset_prefix_cache()
    expected = local(prefill, PROMPT, GREEDY)
    out, request, _ = disaggregated(prefill, decode, PROMPT, GREEDY, tamper=tamper)
    assert request.kv_import.state == "failed", name
    assert request.kv_import.computed_locally > 0
    assert out.outputs[0].token_ids == expected.outputs[0].token_ids
    assert_all_free(decode)


def test_abort_while_waiting_for_kv_frees_the_allocated_blocks(decode):
    engine = decode.engine
    request = engine.make_request(PROMPT, GREEDY, remote_prefill=True)
    engine.add(request)
    engine.step()
    assert request.seqs[0].block_table
    engine.abort(request.request_id)
    assert request.finished
    assert_all_free(decode)


def test_prefill_only_request_ends_after_the_first_token_and_frees_its_blocks(prefill):
    blocks, first, request = run_prefill(prefill, PROMPT, GREEDY, skip_blocks=1)
    assert [b.block_index for b in blocks] == [1, 2]
    assert len(first) == 1 and all(s.finish_reason == "prefilled" for s in request.seqs)
    cfg = prefill.engine.model_config
    assert [tuple(b.tensor.shape) for b in blocks] == [
        (cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim),
        (cfg.num_layers, 2, 5, cfg.num_kv_heads, cfg.head_dim),
    ]
    assert_all_free(prefill)


# ---- by reference (what the same-GPU transport asks for; services/kv/cuda_ipc.py) ----------


def as_views(prefill, refs: list[BlockRef]) -> list[BlockData]:
    """What the receiving side makes of references: views of the sender's pool."""
    pool = prefill.engine.runner.kv_cache
    return [BlockData(r.block_index, r.block_hash, pool[:, :, r.pool_block, :r.num_tokens]) for r in refs]


def test_by_reference_ships_slots_and_holds_them_until_released(prefill, decode):
    decode.engine.block_manager.reset_prefix_cache()
    expected = local(prefill, PROMPT, GREEDY)
    prefill.engine.block_manager.reset_prefix_cache()
    refs, first, prefill_request = run_prefill(prefill, PROMPT, GREEDY, skip_blocks=0, by_reference=True)
    assert all(isinstance(r, BlockRef) for r in refs)
    assert [(r.block_index, r.num_tokens) for r in refs] == [(0, 16), (1, 16), (2, 5)]
    assert len({r.pool_block for r in refs}) == 3
    # The request is over, but its slots stay allocated: nothing can overwrite them yet.
    assert prefill_request.finished and prefill.engine.is_held(prefill_request.request_id)
    bm = prefill.engine.block_manager
    assert all(bm.blocks[r.pool_block].ref_count == 1 for r in refs)
    with pytest.raises(AssertionError, match="still held"):
        bm.assert_all_free()

    engine = decode.engine
    request = engine.make_request(PROMPT, GREEDY, remote_prefill=True)
    engine.add(request)
    engine.step()
    for block in as_views(prefill, refs):
        engine.receive_kv(request.request_id, block)
    engine.finish_kv(request.request_id, first, prefill_request.num_cached_tokens)
    assert prefill.engine.release_kv(prefill_request.request_id)
    assert not prefill.engine.release_kv(prefill_request.request_id)  # once only
    while engine.has_unfinished():
        engine.step()
    assert build_output(request, delta=False).outputs[0].token_ids == expected.outputs[0].token_ids
    assert_all_free(prefill)
    assert_all_free(decode)


def test_held_slots_survive_other_requests_until_released(prefill):
    engine = prefill.engine
    engine.block_manager.reset_prefix_cache()
    refs, _, request = run_prefill(prefill, PROMPT, GREEDY, skip_blocks=0, by_reference=True)
    before = [engine.runner.kv_cache[:, :, r.pool_block].clone() for r in refs]
    engine.block_manager.reset_prefix_cache()  # nothing held may be dropped or handed out
    for i in range(3):
        local(prefill, list(range(3000 + 100 * i, 3060 + 100 * i)), GREEDY)
    assert all(torch.equal(engine.runner.kv_cache[:, :, r.pool_block], b) for r, b in zip(refs, before))
    engine.release_kv(request.request_id)
    assert_all_free(prefill)


def test_abort_of_a_by_reference_prefill_holds_what_was_named(prefill):
    engine = prefill.engine
    request = engine.make_request(list(range(500, 600)), GREEDY, kv_export_from=0, kv_by_reference=True)
    engine.add(request)
    engine.step()  # the whole prompt in one step, first token sampled: shipped and finished
    request2 = engine.make_request(list(range(700, 800)), GREEDY, kv_export_from=0, kv_by_reference=True)
    engine.add(request2)
    engine.abort(request2.request_id)  # before any step: nothing named, nothing to hold
    assert not engine.is_held(request2.request_id)
    assert engine.is_held(request.request_id)
    engine.release_kv(request.request_id)
    assert_all_free(prefill)

    chunked = make_llm("tiny-llama", max_num_batched_tokens=32)
    engine = chunked.engine
    request = engine.make_request(list(range(500, 600)), GREEDY, kv_export_from=0, kv_by_reference=True)
    engine.add(request)
    engine.step()  # 32 of 100 tokens: two blocks named to the peer
    shipped = build_output(request, delta=True).kv_blocks
    assert [r.block_index for r in shipped] == [0, 1]
    engine.abort(request.request_id)
    assert request.finished and engine.is_held(request.request_id)
    assert engine.release_kv(request.request_id)
    assert_all_free(chunked)


def test_slots_named_before_a_preemption_stay_put_while_the_prompt_is_recomputed():
    """A preempted by-reference export recomputes its prompt into other slots; the slots it
    already named keep their KV for the peer, and release_kv frees old and new alike."""
    llm = make_llm("tiny-llama", max_num_batched_tokens=32)
    engine = llm.engine
    prompt = list(range(500, 600))
    expected = {b.block_index: b.tensor for b in run_prefill(llm, prompt, GREEDY, 0)[0]}
    engine.block_manager.reset_prefix_cache()
    request = engine.make_request(prompt, GREEDY, kv_export_from=0, kv_by_reference=True)
    engine.add(request)
    engine.step()
    named = build_output(request, delta=True).kv_blocks  # blocks 0 and 1
    engine.scheduler._preempt(request.seqs[0])  # what the scheduler does under memory pressure
    engine.block_manager.reset_prefix_cache()  # and the recompute may not find them cached
    engine.add_request(list(range(3000, 3100)), GREEDY)  # another prompt, into whatever slots are free
    while engine.has_unfinished():
        engine.step()
        named += build_output(request, delta=True).kv_blocks
    assert [r.block_index for r in named] == [0, 1, 2, 3, 4, 5, 6]
    pool = engine.runner.kv_cache
    for r in named:
        torch.testing.assert_close(pool[:, :, r.pool_block, :r.num_tokens], expected[r.block_index])
    assert engine.release_kv(request.request_id)
    assert_all_free(llm)
