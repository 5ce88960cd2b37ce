"""Async scheduling (engine.py): step N+1 is planned and launched before step N is read back.

On the CPU the device runs each op as it is called, so nothing overlaps here, but the
bookkeeping is the same as on a GPU: placeholders, the device-side gather of pending tokens,
stop rules read one step late, dropped tokens of stopped sequences. These tests check that
async scheduling changes no output and leaks no block; the speed-up is measured on the GPU
(loadtest/bench_gpu.py).
"""

from __future__ import annotations

import asyncio

import pytest

from services.engine import AsyncEngine, SamplingParams
from services.engine.block_manager import BlockManager
from services.engine.outputs import SampledToken
from services.engine.scheduler import Scheduler, SchedulerConfig
from services.engine.sequence import PENDING_TOKEN, Request, Sequence
from tests.conftest import assert_all_free, make_llm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[101 + 37 * i + j for j in range(9 + 13 * i)] for i in range(8)]


def make(**kwargs):
    """A tiny engine; the pool is sized in blocks, so the test does not depend on the device's memory."""
    kwargs.setdefault("num_kv_blocks", 512)
    return make_llm("tiny-llama", **kwargs)


def greedy(n_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True, **kw)


def mixed_params(reference_tokens: list[int]) -> list[SamplingParams]:
    """One request of each kind: plain, seeded top-p, stop token, min_tokens, n > 1, logprobs,
    penalties, a single token."""
    stop = reference_tokens[5]
    return [
        greedy(12),
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True),
        greedy(16, stop_token_ids=[stop]),
        greedy(9, stop_token_ids=[reference_tokens[0]], min_tokens=3),
        SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=7, ignore_eos=True),
        greedy(6, logprobs=2),
        greedy(8, repetition_penalty=1.3, frequency_penalty=0.4),
        greedy(1),
    ]


def outputs(llm, params, prompts=PROMPTS):
    out = llm.generate(prompts, params)
    return [[(c.index, c.token_ids, c.finish_reason, c.stop_reason,
              [sorted(p) for p in c.logprobs] if c.logprobs else None) for c in r.outputs] for r in out]


@pytest.mark.parametrize("engine_kwargs", [
    {},
    {"max_num_batched_tokens": 16},  # chunked prefill mixed with decodes
    {"max_num_seqs": 3},  # admission as others finish
])
def test_async_scheduling_changes_no_output(engine_kwargs):
    sync = make(async_scheduling=False, **engine_kwargs)
    reference_tokens = sync.generate(PROMPTS[0], greedy(16))[0].outputs[0].token_ids
    params = mixed_params(reference_tokens)
    expected = outputs(sync, params)
    llm = make(async_scheduling=True, **engine_kwargs)
    assert outputs(llm, params) == expected
    assert_all_free(llm)
    assert not llm.engine.has_step_in_flight


def test_async_scheduling_changes_no_output_under_preemption():
    kwargs = {"num_kv_blocks": 24, "block_size": 4, "max_model_len": 64}
    prompts = [p[:20] for p in PROMPTS[1:7]]
    params = [greedy(30), SamplingParams(temperature=1.0, seed=5, max_tokens=30, ignore_eos=True)] * 3
    sync = make(async_scheduling=False, **kwargs)
    expected = outputs(sync, params, prompts)
    llm = make(async_scheduling=True, **kwargs)
    assert outputs(llm, params, prompts) == expected
    assert llm.engine.scheduler.num_preemptions > 0  # the case is what it says
    assert_all_free(llm)


def with_static_decode_steps(llm, max_batch: int = 8) -> list[int]:
    """Route the engine's decode-only steps through cuda_graphs.DecodeGraphs, which on the CPU
    runs its captured forward eagerly: the same staged buffers, in-graph gathers of pending
    tokens and block tables, padding rows and argmax as a GPU replay. Returns the list of
    the batch sizes it ran."""
    from services.engine.cuda_graphs import DecodeGraphs

    runner = llm.engine.runner
    runner.graphs = DecodeGraphs(runner.model, runner.backend, runner.kv_caches, max_batch,
                                 runner.tables.device_table, runner.num_kv_heads, runner.device)
    return _recording_runs(runner.graphs)


def _recording_runs(graphs) -> list[int]:
    """Capture `graphs` (nothing to capture on the CPU); the list of the sizes `run` takes."""
    graphs.capture()
    ran, run = [], graphs.run
    graphs.run = lambda n, *draw: ran.append(n) or run(n, *draw)
    return ran


def sample(temperature: float, n_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=temperature, max_tokens=n_tokens, ignore_eos=True, **kw)


TEMPERATURE_ROWS = [sample(0.7, 12, seed=11),
                    sample(1.3, 10),  # the engine's stream
                    greedy(9),
                    sample(0.9, 6, top_k=1)]  # top_k 1: greedy
FILTER_ROWS = [sample(0.8, 12, top_k=50, top_p=0.9, seed=11),
               sample(1.1, 10, top_k=5),  # unseeded: the engine's stream
               greedy(9),
               sample(0.5, 11, min_p=0.8, seed=4),  # min_p alone
               sample(0.9, 8),  # temperature alone, beside filtering rows
               sample(1.0, 9, top_k=64, top_p=0.5, min_p=0.3),  # the cap itself, every filter
               sample(0.7, 7, top_k=20, top_p=0.6, seed=2)]


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("batch, graph", [
    (TEMPERATURE_ROWS, "draw"),
    (FILTER_ROWS, "filtered"),
    ([*FILTER_ROWS[:3], sample(0.8, 8, top_k=65, seed=1)], None),  # top_k past sampler.GRAPH_TOP_K
    ([*TEMPERATURE_ROWS, sample(0.8, 8, top_p=0.5, seed=1)], None),  # top_p without top_k
], ids=["temperature", "top_k top_p min_p", "top_k past the cap", "top_p alone"])
def test_static_decode_steps_draw_their_rows_themselves(async_scheduling, batch, graph):
    """Rows that sample with temperature alone, or with top_k (up to sampler.GRAPH_TOP_K),
    top_p beside it and min_p, seeded or not, beside greedy ones: the decode graph draws
    their tokens itself (the sampler launches nothing), and they are the tokens the sampler
    draws in an eager step; a top_k past the cap, or a top_p without a top_k, sends the step
    back to the sampler."""
    prompts = [p[:20] for p in PROMPTS[:len(batch)]]
    expected = outputs(make(async_scheduling=False), batch, prompts)
    llm = make(async_scheduling=async_scheduling)
    with_static_decode_steps(llm)
    graphs, ran = llm.engine.runner.graphs, []
    run = graphs.run
    graphs.run = lambda n, draw=False, filtered=False: ran.append((draw, filtered)) or run(n, draw, filtered)
    assert outputs(llm, batch, prompts) == expected
    if graph is None:  # not while every row decodes (the first steps)
        assert ran and not any(draw for draw, _ in ran[:4])
    else:
        assert (True, graph == "filtered") in ran[:4]
        assert (True, graph != "filtered") not in ran
    assert_all_free(llm)


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("engine_kwargs", [
    {},
    {"max_num_batched_tokens": 16},  # chunked prefill: eager steps between the static ones
    {"max_num_batched_tokens": 3},  # one-token prompt chunks beside decodes: rows that do not sample
    {"max_num_batched_tokens": 1},  # steps of one prompt token: nothing samples, the last tokens kept
    {"num_kv_blocks": 24, "block_size": 4, "max_model_len": 64},  # preemption
])
def test_static_decode_steps_change_no_output(async_scheduling, engine_kwargs):
    """Decode batches of 1-8 in buckets 1, 2, 4 and 8 (padding rows in the sizes between),
    after a static step or an eager one (a prefill, or a sampler that drew the tokens
    itself), greedy or not."""
    sync = make(async_scheduling=False, **engine_kwargs)
    reference_tokens = sync.generate(PROMPTS[0], greedy(16))[0].outputs[0].token_ids
    params = mixed_params(reference_tokens)
    prompts = [p[:20] for p in PROMPTS]
    expected = outputs(sync, params, prompts)
    llm = make(async_scheduling=async_scheduling, **engine_kwargs)
    ran = with_static_decode_steps(llm)
    assert outputs(llm, params, prompts) == expected
    assert ran
    if not engine_kwargs:
        assert set(ran) - {1, 2, 4, 8}  # a batch with padding rows
    if "num_kv_blocks" in engine_kwargs:
        assert llm.engine.scheduler.num_preemptions > 0
    assert_all_free(llm)


def with_static_prefill_steps(llm, max_tokens: int = 64) -> list[int]:
    """Route the engine's steps of one prompt chunk alone through cuda_graphs.PrefillGraphs,
    which on the CPU runs its captured forward eagerly: the same staged buffers, padding
    tokens, in-graph block-table gather and argmax as a GPU replay. Returns the chunk
    lengths it ran."""
    from services.engine.cuda_graphs import PrefillGraphs

    runner = llm.engine.runner
    runner.prefill_graphs = PrefillGraphs(runner.model, runner.backend, runner.kv_caches, max_tokens,
                                          runner.tables.device_table, runner.device)
    return _recording_runs(runner.prefill_graphs)


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("engine_kwargs", [
    {"max_num_seqs": 1},  # one request at a time: every prompt of at most 64 tokens is one static step
    {"max_num_seqs": 1, "max_num_batched_tokens": 16},  # chunks of a bucket's size, then the rest
    {"max_num_seqs": 1, "max_num_batched_tokens": 5},  # chunks that do not sample, then one that does
])
def test_static_prefill_steps_change_no_output(async_scheduling, engine_kwargs):
    """Prompt chunks of 2-64 tokens in buckets 16, 32 and 64 (padding tokens in all but
    those sizes), a prefix-cache hit (the same prompts twice), with static decode steps
    between them, greedy or not; longer chunks run eagerly."""
    sync = make(async_scheduling=False, **engine_kwargs)
    reference_tokens = sync.generate(PROMPTS[0], greedy(16))[0].outputs[0].token_ids
    params = mixed_params(reference_tokens)
    expected = outputs(sync, params)
    llm = make(async_scheduling=async_scheduling, **engine_kwargs)
    ran = with_static_prefill_steps(llm)
    with_static_decode_steps(llm)
    assert outputs(llm, params) == expected
    assert outputs(llm, params[:3], PROMPTS[:3]) == expected[:3]  # cached prefixes: context before the chunk
    assert ran and set(ran) - {16, 32, 64}
    assert_all_free(llm)


def test_prefill_graph_capture_stages_every_row_of_the_largest_bucket_as_padding():
    """The captures run the largest bucket first, and stage() pads only the chunk's own
    bucket: rows past it came from the pinned buffers, which may hold an earlier engine's
    data (on an H200 that was an out-of-range embedding index at capture)."""
    llm = make(max_num_seqs=1)
    runner = llm.engine.runner
    with_static_prefill_steps(llm, max_tokens=64)
    graphs = runner.prefill_graphs
    for host in graphs._host._host:
        host.fill_(987654321)  # memory an earlier engine of this process left behind
    graphs.stage_capture_inputs()
    assert graphs.input_ids.tolist() == [0] * graphs.width
    assert graphs.positions.tolist() == [0] * graphs.width
    assert graphs.slots.tolist() == [-1] * graphs.width
    assert graphs.row.tolist() == [0] and graphs.last.tolist() == [0]
    assert graphs.query_start.tolist() == [0, 1] and graphs.seq_len.tolist() == [1]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_static_prefill_steps_recompute_a_preempted_sequence(async_scheduling):
    """Two sequences that cannot both finish in the pool: one is preempted, and once the other
    is done it recomputes what of its prompt and output is not cached, alone: a static step."""
    kwargs = {"max_num_seqs": 2, "num_kv_blocks": 14, "block_size": 4, "max_model_len": 48}
    prompts, params = [PROMPTS[1][:20], PROMPTS[2][:20]], [greedy(24), greedy(24)]
    expected = outputs(make(async_scheduling=False, **kwargs), params, prompts)
    llm = make(async_scheduling=async_scheduling, **kwargs)
    ran = with_static_prefill_steps(llm)
    assert outputs(llm, params, prompts) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert ran  # only the recomputation runs alone (the blocks still cached leave it a chunk after context)
    assert_all_free(llm)


def test_plain_decodes_stay_in_flight_and_read_their_input_on_the_device():
    llm = make(async_scheduling=True)
    engine = llm.engine
    request = engine.add_request(PROMPTS[1], greedy(6))
    seq = request.seqs[0]
    engine.step()  # the prompt: launched, its first token pending
    assert engine.has_step_in_flight
    assert seq.token_ids[-1] == PENDING_TOKEN and seq.num_pending == 1
    assert request.seqs[0].output_token_ids == []  # outputs never show a placeholder
    plan = engine.scheduler.schedule()
    assert [s.token_ids for s in plan.seqs] == [[PENDING_TOKEN]]  # the decode of a token not read back
    engine.abort(request.request_id)
    assert seq.token_ids == PROMPTS[1] and seq.num_pending == 0  # the dropped token is gone
    assert_all_free(llm)


def test_a_step_the_host_must_see_is_read_back_at_once():
    llm = make(async_scheduling=True)
    engine = llm.engine
    engine.add_request(PROMPTS[1], SamplingParams(temperature=0.8, seed=1, n=2, max_tokens=6))  # forks
    engine.step()
    assert not engine.has_step_in_flight
    while engine.has_unfinished():
        engine.step()
    assert_all_free(llm)


def test_logprobs_stay_in_flight_and_match_synchronous_steps():
    """Logprobs come back with the step's tokens: the step is not read back at once, and the
    values are those of synchronous steps."""
    params = [greedy(8, logprobs=3), SamplingParams(temperature=0.7, seed=5, max_tokens=8, ignore_eos=True, logprobs=2)]
    expected = make(async_scheduling=False).generate(PROMPTS[:2], params)
    llm = make(async_scheduling=True)
    engine = llm.engine
    ids = [engine.add_request(p, sp).request_id for p, sp in zip(PROMPTS[:2], params, strict=True)]
    engine.step()
    assert engine.has_step_in_flight
    done = {}
    while engine.has_unfinished():
        done.update({r.request_id: r for r in engine.step() if r.finished})
    for request_id, reference in zip(ids, expected, strict=True):
        got, want = done[request_id].seqs[0], reference.outputs[0]
        assert got.output_token_ids == want.token_ids
        assert len(got.logprobs) == len(want.logprobs) == 8
        for ours, theirs in zip(got.logprobs, want.logprobs, strict=True):
            assert sorted(ours) == sorted(theirs)
            assert all(abs(ours[t].logprob - theirs[t].logprob) < 1e-4 and ours[t].rank == theirs[t].rank
                       for t in ours)
    assert_all_free(llm)


def test_the_last_token_before_a_limit_is_not_decoded_again():
    """A sequence whose pending token reaches max_tokens (or max_model_len) is not scheduled:
    the read-back finishes it."""
    manager = BlockManager(32, 4)
    sched = Scheduler(SchedulerConfig(64, 8, max_model_len=12), manager)
    a = Request("a", list(range(5)), greedy(1))
    b = Request("b", list(range(11)), greedy(50))
    c = Request("c", list(range(5)), greedy(50))
    for i, r in enumerate((a, b, c)):
        r.arrival_order = i
        r.seqs = [Sequence(i, 0, r, list(r.prompt_token_ids))]
        sched.add(r)
    plan = sched.schedule()
    sched.advance(plan)
    assert all(r.seqs[0].num_pending == 1 for r in (a, b, c))
    again = sched.schedule()
    assert [s.seq_id for s in again.seqs] == [2]  # a: max_tokens, b: max_model_len
    # The engine's order: launch `again`, read back `plan`, then advance `again`.
    sched.update(plan, {i: [SampledToken(9, None)] for i in range(3)},
                 lambda seq, tok: sched.finish(seq, "length") if seq.request is not c else None)
    sched.advance(again)
    assert a.seqs[0].token_ids[-1] == 9 and a.finished and b.finished
    assert c.seqs[0].token_ids[-2:] == [9, PENDING_TOKEN]  # read back, and the next one pending


def test_streamed_deltas_have_no_placeholder_and_add_up():
    llm = make(async_scheduling=True)
    expected = llm.generate(PROMPTS[2], greedy(10))[0].outputs[0].token_ids

    async def stream():
        engine = AsyncEngine(core=llm.engine)
        try:
            tokens = []
            async for out in engine.generate(PROMPTS[2], greedy(10)):
                for c in out.outputs:
                    assert PENDING_TOKEN not in c.token_ids
                    tokens += c.token_ids
            return tokens
        finally:
            engine.shutdown()

    assert asyncio.run(stream()) == expected
    assert_all_free(llm)
