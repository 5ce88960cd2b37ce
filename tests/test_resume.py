"""Resuming a request's sequences on another engine (migration, issue #25), in process.

A resumed sequence gets the original prompt plus the output already streamed; it must then
produce exactly what an uninterrupted run produces: penalties, min_tokens, stop strings, text
and seeded draws all continue through the resumed output.
"""

from __future__ import annotations

import pytest

from services.engine import SamplingParams
from services.engine.errors import InvalidRequestError
from services.engine.outputs import build_output
from services.engine.sequence import Resumed
from tests.conftest import make_llm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = list(range(300, 340))


@pytest.fixture(scope="module")
def llm():
    return make_llm("tiny-llama")


def run(llm, params: SamplingParams, resume: list[Resumed] | None = None):
    engine = llm.engine
    request = engine.make_request(PROMPT, params, resume=resume)
    engine.add(request)
    while engine.has_unfinished() or engine.has_step_in_flight:
        engine.step()
    return build_output(request, delta=False)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.5),
    SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=24, min_tokens=20, frequency_penalty=0.4),
    SamplingParams(temperature=1.0, top_k=20, seed=3, max_tokens=24, logprobs=2, ignore_eos=True),
], ids=["greedy-penalties", "seeded-min-tokens", "seeded-logprobs"])
@pytest.mark.parametrize("at", [0, 1, 23])
def test_a_resumed_sequence_continues_exactly_as_an_uninterrupted_run(llm, params, at):
    full = run(llm, params).outputs[0]
    resumed = run(llm, params, [Resumed(0, full.token_ids[:at])]).outputs[0]
    assert resumed.token_ids == full.token_ids
    assert resumed.text == full.text
    assert resumed.finish_reason == full.finish_reason
    if params.logprobs is not None:
        # Recomputed in one prefill rather than step by step: equal up to float rounding.
        for got, want in zip(resumed.logprobs[at:], full.logprobs[at:], strict=True):
            assert got.keys() == want.keys()
            assert [got[t].logprob for t in got] == pytest.approx([want[t].logprob for t in got], abs=1e-4)


def test_each_unfinished_sequence_of_n_resumes_at_its_own_position(llm):
    params = SamplingParams(n=3, temperature=0.8, seed=11, max_tokens=16, ignore_eos=True, repetition_penalty=1.2)
    full = run(llm, params).outputs
    out = run(llm, params, [Resumed(2, full[2].token_ids[:5]), Resumed(0, full[0].token_ids[:12])]).outputs
    assert {c.index: c.token_ids for c in out} == {0: full[0].token_ids, 2: full[2].token_ids}


def test_a_stop_string_spanning_the_resume_point_still_stops(llm):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    text = run(llm, greedy).outputs[0].text
    stop = text[10:16]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    full = run(llm, params).outputs[0]
    assert full.finish_reason == "stop" and full.text == text[:10]
    for at in range(1, len(full.token_ids)):  # the token completing it finishes it in the same message
        out = run(llm, params, [Resumed(0, full.token_ids[:at])]).outputs[0]
        assert (out.text, out.finish_reason, out.stop_reason) == (full.text, "stop", stop)


def test_streamed_text_continues_after_what_the_client_has(llm):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = run(llm, params).outputs[0]
    engine = llm.engine
    head = llm.tokenizer.decode(full.token_ids[:8])
    request = engine.make_request(PROMPT, params, resume=[Resumed(0, full.token_ids[:8], len(head))])
    engine.add(request)
    streamed = ""
    tokens: list[int] = []
    while engine.has_unfinished() or engine.has_step_in_flight:
        engine.step()
        for c in build_output(request, delta=True).outputs:
            streamed += c.text
            tokens += c.token_ids
    assert tokens == full.token_ids[8:]
    assert head + streamed == full.text


@pytest.mark.parametrize("resume", [
    [Resumed(1, [5])],  # index >= n
    [Resumed(0, [5]), Resumed(0, [6])],
    [Resumed(0, [10**6])],
    [Resumed(0, list(range(8)))],  # max_tokens already reached
])
def test_bad_resumes_are_refused(llm, resume):
    with pytest.raises(InvalidRequestError):
        llm.engine.make_request(PROMPT, SamplingParams(max_tokens=8), resume=resume)
