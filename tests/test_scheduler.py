"""Scheduler without a model: budgets, chunking, admission order, preemption, abort, fork."""

from __future__ import annotations

import itertools

from services.engine.block_manager import BlockManager
from services.engine.outputs import SampledToken
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from services.engine.sequence import Request, Sequence, SequenceStatus

_ids = itertools.count()


def make_request(num_prompt: int, priority: int = 0, n: int = 1, max_tokens: int = 100) -> Request:
    rid = next(_ids)
    request = Request(f"r{rid}", list(range(100, 100 + num_prompt)), SamplingParams(n=n, max_tokens=max_tokens),
                      priority=priority, arrival_order=rid)
    request.seqs = [Sequence(rid * 1000, 0, request, list(request.prompt_token_ids))]
    return request


def make_scheduler(num_blocks=64, block_size=4, budget=64, max_seqs=16) -> Scheduler:
    return Scheduler(SchedulerConfig(budget, max_seqs), BlockManager(num_blocks, block_size))


def step(sched: Scheduler, token: int = 7) -> StepPlan:
    """One step with a fake model: every sequence that samples gets `token` (n of them on fork)."""
    plan = sched.schedule()
    sampled = {s.seq_id: [SampledToken(token, None)] * len(s.sample.seq_indices) for s in plan.seqs if s.sample}
    sched.advance(plan)
    sched.update(plan, sampled, lambda seq, tok: None)
    return plan


def scheduled(plan: StepPlan) -> list[tuple[int, int, int]]:
    """(seq_id, start_pos, num_tokens) of each scheduled sequence."""
    return [(s.seq_id, s.start_pos, len(s.token_ids)) for s in plan.seqs]


def test_long_prompt_is_prefilled_in_chunks_under_the_token_budget():
    sched = make_scheduler(budget=8)
    r = make_request(20)
    sched.add(r)
    sid = r.seqs[0].seq_id
    plans = [step(sched) for _ in range(4)]
    assert [scheduled(p) for p in plans] == [[(sid, 0, 8)], [(sid, 8, 8)], [(sid, 16, 4)], [(sid, 20, 1)]]
    assert [p.seqs[0].sample is not None for p in plans] == [False, False, True, True]
    assert r.seqs[0].num_output_tokens == 2


def test_decodes_and_a_prefill_chunk_share_one_step():
    sched = make_scheduler(budget=8)
    a, b = make_request(3), make_request(30)
    sched.add(a)
    step(sched)  # a's prompt
    sched.add(b)
    plan = step(sched)
    assert scheduled(plan) == [(a.seqs[0].seq_id, 3, 1), (b.seqs[0].seq_id, 0, 7)]


def test_max_num_seqs_caps_running_sequences():
    sched = make_scheduler(max_seqs=2)
    reqs = [make_request(4) for _ in range(3)]
    for r in reqs:
        sched.add(r)
    plan = step(sched)
    assert [s.seq_id for s in plan.seqs] == [reqs[0].seqs[0].seq_id, reqs[1].seqs[0].seq_id]
    assert sched.num_waiting == 1


def test_lower_priority_value_is_admitted_first_then_first_come_first_served():
    sched = make_scheduler(max_seqs=2)
    late_low, urgent, late_urgent = make_request(4, priority=5), make_request(4, priority=0), make_request(4, priority=0)
    for r in (late_low, urgent, late_urgent):
        sched.add(r)
    plan = step(sched)
    assert [s.seq_id for s in plan.seqs] == [urgent.seqs[0].seq_id, late_urgent.seqs[0].seq_id]


def test_running_out_of_blocks_preempts_the_newest_sequence_and_recomputes_it_later():
    # 4 blocks of 4 tokens; two 7-token prompts take 2 blocks each.
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = make_request(7), make_request(7)
    sched.add(a)
    sched.add(b)
    seq_a, seq_b = a.seqs[0], b.seqs[0]
    step(sched)  # prompts computed; 8 tokens each
    plan = step(sched)  # position 7 still fits in each one's second block
    assert scheduled(plan) == [(seq_a.seq_id, 7, 1), (seq_b.seq_id, 7, 1)]
    assert sched.num_preemptions == 0
    plan = step(sched)  # a needs a third block: b, the newest, is preempted
    assert scheduled(plan) == [(seq_a.seq_id, 8, 1)]
    assert sched.num_preemptions == 1
    assert seq_b.status is SequenceStatus.WAITING
    assert seq_b.num_computed_tokens == 0 and seq_b.block_table == []
    # b keeps its 9 tokens; its two full blocks stayed cached, so it recomputes only token 8.
    assert seq_b.num_tokens == 9
    sched.abort(a)
    plan = step(sched)
    assert scheduled(plan) == [(seq_b.seq_id, 8, 1)]
    sched.abort(b)
    sched.block_manager.assert_all_free()


def test_preemption_picks_the_lowest_priority_sequence_even_if_older():
    sched = make_scheduler(num_blocks=4, block_size=4)
    low, high = make_request(7, priority=9), make_request(7, priority=1)
    sched.add(low)
    sched.add(high)
    while sched.num_preemptions == 0:
        step(sched)
    assert low.seqs[0].status is SequenceStatus.WAITING
    assert high.seqs[0].status is SequenceStatus.RUNNING


def test_a_preempting_step_admits_nothing_new():
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = make_request(7), make_request(7)
    sched.add(a)
    sched.add(b)
    while sched.num_preemptions == 0:
        step(sched)
    # The step that preempted b did not re-admit it in the same breath.
    assert b.seqs[0].status is SequenceStatus.WAITING


def test_abort_frees_blocks_of_running_and_waiting_requests():
    sched = make_scheduler(num_blocks=8, block_size=4, max_seqs=1)
    running, waiting = make_request(10), make_request(10)
    sched.add(running)
    sched.add(waiting)
    step(sched)
    assert running.seqs[0].block_table and not waiting.seqs[0].block_table
    sched.abort(running)
    sched.abort(waiting)
    assert [s.finish_reason for s in running.seqs + waiting.seqs] == ["abort", "abort"]
    assert not sched.has_unfinished()
    sched.block_manager.assert_all_free()


def test_n_sequences_fork_after_the_prompt_and_share_its_blocks():
    sched = make_scheduler(num_blocks=16, block_size=4)
    r = make_request(6, n=3)
    sched.add(r)
    plan = step(sched, token=42)
    assert plan.seqs[0].sample.seq_indices == (0, 1, 2)
    assert [s.index for s in r.seqs] == [0, 1, 2]
    assert [s.seq_id for s in r.seqs] == [r.seqs[0].seq_id + i for i in range(3)]
    assert all(s.token_ids == list(range(100, 106)) + [42] for s in r.seqs)
    assert all(s.block_table == r.seqs[0].block_table for s in r.seqs)
    bm = sched.block_manager
    assert [bm.blocks[b].ref_count for b in r.seqs[0].block_table] == [3, 3]
    # Next step: each sibling writes position 6 into the shared partial block -> two copies.
    plan = step(sched)
    assert len(plan.block_copies) == 2
    assert len({s.block_table[1] for s in r.seqs}) == 3
    sched.abort(r)
    bm.assert_all_free()


def test_a_waiting_request_with_n_counts_all_its_sequences_against_max_num_seqs():
    sched = make_scheduler(max_seqs=3)
    a, b = make_request(4), make_request(4, n=3)
    sched.add(a)
    sched.add(b)
    plan = step(sched)
    assert [s.seq_id for s in plan.seqs] == [a.seqs[0].seq_id]


def test_request_finished_counts_sequences_finished_by_the_scheduler():
    sched = make_scheduler()
    one, forked = make_request(4), make_request(4, n=2)
    sched.add(one)
    sched.add(forked)
    step(sched)  # prompts computed; `forked` forks into two sequences
    assert len(forked.seqs) == 2 and not forked.finished
    sched.finish(forked.seqs[0], "stop")
    assert forked.num_finished == 1 and not forked.finished
    sched.finish(forked.seqs[1], "length")
    assert forked.finished and not one.finished
    sched.abort(one)
    assert one.finished and one.num_finished == 1


def test_output_tokens_from_skip_the_prompt_and_a_pending_placeholder():
    sched = make_scheduler()
    request = make_request(3)
    sched.add(request)
    step(sched, token=7)
    step(sched, token=8)
    seq = request.seqs[0]
    sched.advance(sched.schedule())  # a step in flight: its token is a placeholder
    assert seq.num_pending == 1
    assert seq.num_read_back_tokens == len(seq.output_token_ids) == 2
    assert seq.output_token_ids_from(0) == seq.output_token_ids == [7, 8]
    assert seq.output_token_ids_from(1) == [8] and seq.output_token_ids_from(2) == []
