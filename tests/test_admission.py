"""Admission control (services/engine/admission.py): exact queue accounting, and an AsyncEngine
that refuses past its bound before doing any work for the refused request."""

from __future__ import annotations

import asyncio

import pytest

from services.engine import SamplingParams
from services.engine.admission import Admission, AdmissionLimits
from services.engine.async_engine import AsyncEngine
from services.engine.errors import ConfigError, OverloadedError
from tests.conftest import make_llm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_refuses_the_request_that_would_pass_either_bound():
    admission = Admission(AdmissionLimits(max_queued_requests=2, max_queued_tokens=100))
    a = admission.reserve(60)
    with pytest.raises(OverloadedError, match="60 prompt tokens are already waiting"):
        admission.reserve(41)
    b = admission.reserve(40)
    assert admission.queued == (2, 100)
    with pytest.raises(OverloadedError, match="2 requests are already waiting"):
        admission.reserve(1)
    admission.release(a)
    admission.release(a)  # twice is once
    assert admission.queued == (1, 40)
    admission.release(b)
    assert admission.queued == (0, 0)


def test_an_empty_queue_admits_a_prompt_larger_than_the_token_bound():
    admission = Admission(AdmissionLimits(max_queued_requests=4, max_queued_tokens=10))
    admission.reserve(500)
    with pytest.raises(OverloadedError):
        admission.reserve(1)


def test_only_requests_the_engine_has_seen_and_seated_leave_the_queue():
    admission = Admission(AdmissionLimits(4, 1000))
    seen, unseen = admission.reserve(10), admission.reserve(20)
    admission.bind(seen, "a")
    admission.bind(unseen, "b")
    admission.seen("a")
    admission.release_started(lambda request_id: False)  # nothing waits any more
    assert admission.queued == (1, 20)  # "b" is still in the engine's inbox: still queued


def test_defaults_come_from_the_engine():
    assert AdmissionLimits.derive(256, 4096) == AdmissionLimits(256, 4096)
    assert AdmissionLimits.derive(256, 4096, requests=8) == AdmissionLimits(8, 4096)
    with pytest.raises(ConfigError):
        AdmissionLimits(0, 10)


def test_async_engine_refuses_past_its_queue_then_serves_everything_it_admitted():
    llm = make_llm(max_num_seqs=1)
    engine = AsyncEngine(core=llm.engine, admission=AdmissionLimits(max_queued_requests=1, max_queued_tokens=10_000))
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)

    async def one(i: int) -> int | str:
        try:
            return sum([len(o.outputs[0].token_ids) async for o in engine.generate([5 + i] * 8, params)])
        except OverloadedError:
            return "refused"

    async def burst() -> list[int | str]:
        return await asyncio.gather(*(one(i) for i in range(6)))

    try:
        results = asyncio.run(burst())
    finally:
        engine.shutdown()
    # All six arrive within a millisecond: the first is queued, and while it is queued or running
    # (one sequence at a time) at most one more finds room; every admitted one runs to its end.
    assert results[0] == 30 and results.count("refused") >= 4, results
    assert all(r == 30 for r in results if r != "refused"), results
    assert engine.admission.queued == (0, 0)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
