"""Engine behaviour on a tiny dummy model: n > 1, stop rules, logprobs, priority, abort,
bad input, and the asyncio entry point. Every test ends with all KV blocks free."""

from __future__ import annotations

import asyncio

import pytest

from services.engine import AsyncEngine, InvalidRequestError, SamplingParams
from services.engine.async_engine import OutputQueue
from services.engine.tokenizer import Tokenizer
from tests.conftest import assert_all_free, make_llm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = [101, 2002, 303, 4004, 505, 6006, 707, 8008, 909, 1234]


@pytest.fixture(scope="module")
def llm():
    return make_llm("tiny-llama")


def greedy(n_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True, **kw)


def completion(llm, prompt=PROMPT, params=None):
    return llm.generate(prompt, params or greedy())[0].outputs[0]


def test_n_greedy_sequences_are_identical_and_indexed(llm):
    out = llm.generate(PROMPT, greedy(12, n=3))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids == out.outputs[2].token_ids
    assert out.outputs[0].token_ids == completion(llm, params=greedy(12)).token_ids
    assert_all_free(llm)


def test_n_seeded_sequences_differ_and_each_is_reproducible(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    first = [c.token_ids for c in llm.generate(PROMPT, params)[0].outputs]
    again = [c.token_ids for c in llm.generate(PROMPT, params)[0].outputs]
    assert first == again
    assert len({tuple(t) for t in first}) == 4
    assert_all_free(llm)


def test_every_forked_sequence_has_its_own_text_and_logprobs(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, logprobs=1)
    for c in llm.generate(PROMPT, params)[0].outputs:
        assert c.text == llm.tokenizer.decode(c.token_ids) and c.text
        assert len(c.logprobs) == 8 and all(t in lp for t, lp in zip(c.token_ids, c.logprobs, strict=True))


def test_n_sequences_share_the_prompt_blocks(llm):
    engine = llm.engine
    request = engine.add_request(PROMPT * 4, greedy(4, n=3))  # 40 tokens: 2 full blocks + partial
    engine.step()  # prompt computed once, then forked
    tables = [s.block_table for s in request.seqs]
    assert len(tables) == 3
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert all(engine.block_manager.blocks[b].ref_count == 3 for b in tables[0][:2])
    while engine.has_unfinished():
        engine.step()
    assert_all_free(llm)


def test_max_tokens_finishes_with_length(llm):
    out = completion(llm, params=greedy(5))
    assert len(out.token_ids) == 5 and out.finish_reason == "length" and out.stop_reason is None


def test_stop_token_id_ends_the_sequence_and_is_kept_in_token_ids(llm):
    reference = completion(llm).token_ids
    stop = reference[6]
    first = reference.index(stop)
    out = completion(llm, params=greedy(stop_token_ids=[stop]))
    assert out.token_ids == reference[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_min_tokens_masks_stop_tokens_until_reached(llm):
    reference = completion(llm, params=greedy(16)).token_ids
    stop = reference[0]
    out = completion(llm, params=greedy(16, stop_token_ids=[stop], min_tokens=4))
    assert len(out.token_ids) >= 4
    assert stop not in out.token_ids[:4]
    assert_all_free(llm)


def test_stop_string_truncates_text_and_is_not_emitted(llm):
    reference = completion(llm).text
    stop = reference[10:14]
    cut = reference.index(stop)
    out = completion(llm, params=greedy(stop=[stop]))
    assert out.text == reference[:cut]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    kept = completion(llm, params=greedy(stop=[stop], include_stop_str_in_output=True))
    assert kept.text == reference[: cut + len(stop)]
    assert_all_free(llm)


def test_logprobs_hold_the_sampled_token_and_top_n_per_position(llm):
    out = completion(llm, params=greedy(6, logprobs=3))
    assert len(out.logprobs) == 6
    for token, position in zip(out.token_ids, out.logprobs, strict=True):
        assert token in position and position[token].rank == 1  # greedy picks the top token
        assert 3 <= len(position) <= 4
        assert sorted(lp.rank for t, lp in position.items()) == [1, 2, 3]
        assert all(lp.logprob <= 0 for lp in position.values())


def test_prompt_reaching_max_model_len_stops_with_length(llm):
    max_len = llm.engine.layout.max_model_len
    prompt = (PROMPT * 60)[: max_len - 3]
    out = completion(llm, prompt, greedy(50))
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    assert_all_free(llm)


def test_lower_priority_value_finishes_first_when_only_one_fits():
    llm = make_llm("tiny-llama", max_num_seqs=1)
    engine = llm.engine
    late = engine.add_request(PROMPT, greedy(4), priority=5)
    urgent = engine.add_request(PROMPT[:5], greedy(4), priority=0)
    finished = []
    while engine.has_unfinished():
        finished += [r.request_id for r in engine.step() if r.finished]
    assert finished == [urgent.request_id, late.request_id]
    assert_all_free(llm)


def test_abort_at_any_point_frees_every_block():
    llm = make_llm("tiny-llama", max_num_batched_tokens=8)
    engine = llm.engine
    for steps_before_abort in range(6):
        request = engine.add_request(PROMPT * 3, greedy(8, n=2))
        for _ in range(steps_before_abort):
            engine.step()
        engine.abort(request.request_id)
        assert request.finished
        assert all(s.finish_reason in ("abort", "length") for s in request.seqs)
        assert_all_free(llm)


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("", greedy(), "empty"),
        ([], greedy(), "empty"),
        ([1, 2, 10**6], greedy(), "token ids"),
        ([1, -5], greedy(), "token ids"),
        (PROMPT * 100, greedy(), "context"),
        (PROMPT, greedy(stop_token_ids=[10**6]), "stop_token_ids"),
        (3.5, greedy(), "prompt"),
    ],
)
def test_bad_input_is_rejected_before_any_block_is_allocated(llm, prompt, params, message):
    with pytest.raises(InvalidRequestError, match=message):
        llm.engine.add_request(prompt, params)
    assert_all_free(llm)


def test_one_bad_request_in_a_batch_queues_none(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate([PROMPT, []], greedy())
    assert_all_free(llm)


def test_async_stream_deltas_add_up_to_the_offline_result(llm):
    reference = completion(llm, params=greedy(12))
    engine = AsyncEngine(core=llm.engine)

    async def collect():
        tokens, text, last = [], "", None
        async for out in engine.generate(PROMPT, greedy(12)):
            for c in out.outputs:
                tokens += c.token_ids
                text += c.text
            last = out
        return tokens, text, last

    try:
        tokens, text, last = asyncio.run(collect())
    finally:
        engine.shutdown()
    assert tokens == reference.token_ids and text == reference.text
    assert last.finished and last.outputs[0].finish_reason == "length"
    assert_all_free(llm)


def test_async_client_leaving_early_aborts_and_frees_blocks(llm):
    engine = AsyncEngine(core=llm.engine)
    aborted = []  # what the engine's abort found still running: the client's leaving, not the end, freed it
    real_abort = llm.engine.abort
    llm.engine.abort = lambda request_id: aborted.append(real_abort(request_id)) or aborted[-1]

    async def leave_after_two():
        seen = 0
        async for _ in engine.generate(PROMPT, greedy(200)):
            seen += 1
            if seen == 2:
                break
        # The abort travels through the engine thread's inbox.
        for _ in range(200):
            if not llm.engine.has_unfinished():
                return seen
            await asyncio.sleep(0.01)
        return seen

    try:
        assert asyncio.run(leave_after_two()) == 2
    finally:
        engine.shutdown()
        del llm.engine.abort
    assert len(aborted) == 1 and aborted[0] is not None, aborted
    assert aborted[0].seqs[0].finish_reason == "abort" and len(aborted[0].seqs[0].output_token_ids) < 200
    assert_all_free(llm)


def test_async_bad_request_raises_in_the_caller(llm):
    engine = AsyncEngine(core=llm.engine)

    async def bad():
        async for _ in engine.generate([], greedy()):
            pass

    try:
        with pytest.raises(InvalidRequestError):
            asyncio.run(bad())
    finally:
        engine.shutdown()
    assert_all_free(llm)


def test_an_output_queue_wakes_its_reader_in_order_and_a_cancelled_wait_loses_nothing():
    async def run() -> tuple:
        queue = OutputQueue()
        gave_up = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        gave_up.cancel()  # a caller that left (cancel, deadline) while waiting for its next output
        with pytest.raises(asyncio.CancelledError):
            await gave_up
        queue.put_nowait("a")
        queue.put_nowait("b")
        first, second = await queue.get(), await queue.get()
        waiting = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        assert not waiting.done()
        queue.put_nowait("c")
        return first, second, await asyncio.wait_for(waiting, 30)

    assert asyncio.run(run()) == ("a", "b", "c")


def test_an_output_queues_sink_takes_items_only_while_nothing_waits_so_the_reader_keeps_their_order():
    taken: list[str] = []

    def sink(item: str) -> bool:
        if item == "bad":
            raise ValueError("broken sink")
        if item.startswith("declined"):
            return False
        taken.append(item)
        return True

    async def run() -> list:
        queue = OutputQueue(sink)
        queue.put_nowait("a")  # taken: nothing waits
        queue.put_nowait("declined 1")
        queue.put_nowait("b")  # queued behind what the reader has not had yet
        queue.put_nowait(RuntimeError("the engine died"))  # errors always go to the reader
        got = [await queue.get() for _ in range(3)]
        queue.put_nowait("c")  # the queue is empty again: taken
        queue.put_nowait("bad")  # the sink raised: the reader gets the error
        got.append(await queue.get())
        return got

    got = asyncio.run(run())
    assert taken == ["a", "c"]
    assert got[:2] == ["declined 1", "b"]
    assert isinstance(got[2], RuntimeError) and isinstance(got[3], ValueError)


def test_detokenizer_never_emits_broken_utf8(llm):
    tokenizer: Tokenizer = llm.tokenizer
    text = "héllo 世界 🤖 naïve café — ok"
    ids = tokenizer.encode(text)
    detok = tokenizer.detokenizer([], skip_special_tokens=True)
    pieces = [detok.step(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some token ended inside a multi-byte character and was held back
    assert "".join(pieces) == text


def test_kv_pool_is_indexed_token_major_and_stored_so_on_the_cpu(llm):
    """runner.kv_cache is indexed (layers, K/V, blocks, block_size, kv_heads, head_dim). On the
    CPU it is stored in that order, so the torch backend's block gathers are plain copies (a
    GPU stores each block head-major for its decode kernel: tests/test_gpu.py)."""
    pool = llm.engine.runner.kv_cache
    layers, kv, blocks, block_size, heads, dim = pool.shape
    assert kv == 2 and pool.storage_offset() == 0 and pool.is_contiguous()


def test_decode_launch_settings_follow_programs_per_sm(monkeypatch):
    """cuda_graphs.decode_splits by (sequence, KV head) programs against 132 SMs (an H200):
    one-tile splits below the SM count, 128-token tiles up to 5 programs an SM (split past
    512 tokens below 3 an SM, past 1,024 from there), 64-token tiles split past 512 above;
    the CPU takes one split."""
    import torch

    from services.engine import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "_num_sms", lambda device: 132)
    gpu = torch.device("cuda")
    by_batch = {(b, kvh): cuda_graphs.decode_splits(b, kvh, gpu)
                for b, kvh in [(1, 3), (1, 8), (16, 8), (17, 8), (64, 3), (49, 8), (50, 8), (64, 8), (82, 8), (83, 8),
                               (256, 3), (256, 8)]}
    assert by_batch == {
        # twice the SMs over the programs, rounded up, then to a power of two, at most 16: 88, 33 -> 16; 3 -> 4
        (1, 3): (16, 64, 64), (1, 8): (16, 64, 64), (16, 8): (4, 64, 64),
        (17, 8): (4, 512, 128), (64, 3): (4, 512, 128), (49, 8): (4, 512, 128),
        (50, 8): (4, 1024, 128), (64, 8): (4, 1024, 128),
        (82, 8): (4, 1024, 128), (83, 8): (4, 512, 64), (256, 3): (4, 512, 64), (256, 8): (4, 512, 64),
    }
    assert cuda_graphs.decode_splits(64, 8, torch.device("cpu")) == (1, 64, 64)


def test_the_cpu_engine_picks_one_matmul_form_and_both_forms_agree(monkeypatch):
    """layers/linear.py: few-row CPU products as x @ W^T or (W @ x^T)^T, whichever this CPU
    runs faster over the given weights; both give the same numbers."""
    import torch

    from services.engine.layers import linear

    monkeypatch.setattr(linear, "_cpu_transposed", linear._cpu_transposed)
    w, x = torch.randn(96, 64), torch.randn(16, 64)
    outputs = []
    for transposed in (True, False):
        linear._cpu_transposed = transposed
        outputs.append(linear.linear(x, w))
    torch.testing.assert_close(outputs[0], outputs[1])
    chosen = linear.choose_cpu_orientation([w, torch.randn(32, 96)], rounds=2)
    assert linear._cpu_transposed is chosen
