"""prompt_logprobs in the engine: every prompt token scored from the raw logits of the position
before it, the same numbers however the prompt is chunked, never skipped for cached blocks."""

from __future__ import annotations

import pytest

from services.engine import SamplingParams
from services.engine.outputs import Logprob
from tests.conftest import assert_all_free, make_llm

PROMPT = list(range(5, 45))  # 40 tokens: 2 full blocks and a partial one


@pytest.fixture(scope="module")
def llm():
    return make_llm("tiny-llama", dtype="float32")


def test_a_prompt_token_is_scored_as_the_sampler_scores_the_same_token_sampled(llm):
    (first,) = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, logprobs=3))
    token = first.outputs[0].token_ids[0]
    (again,) = llm.generate([PROMPT + [token]], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3))
    assert again.prompt_logprobs[-1] == first.outputs[0].logprobs[0]  # same raw distribution, same top 3
    assert first.prompt_logprobs is None
    assert_all_free(llm)


def test_each_position_holds_its_prompt_token_and_the_top_n_in_rank_order(llm):
    (out,) = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2))
    entries = out.prompt_logprobs
    assert len(entries) == len(PROMPT) and entries[0] is None
    for token, entry in zip(PROMPT[1:], entries[1:], strict=True):
        top = sorted((lp for t, lp in entry.items() if lp.rank <= 2), key=lambda lp: lp.rank)
        assert token in entry and [lp.rank for lp in top][:2] == [1, 2] and top[0].logprob >= top[1].logprob
        assert entry[token].rank >= 1 and all(lp.logprob <= 0 for lp in entry.values())
    assert_all_free(llm)


def test_chunked_prefill_gives_the_same_prompt_logprobs():
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    (whole,) = make_llm("tiny-llama", dtype="float32").generate([PROMPT], params)
    chunked_llm = make_llm("tiny-llama", dtype="float32", max_num_batched_tokens=16)
    (chunked,) = chunked_llm.generate([PROMPT], params)
    assert chunked.prompt_logprobs[0] is None
    for a, b in zip(whole.prompt_logprobs[1:], chunked.prompt_logprobs[1:], strict=True):
        assert a.keys() == b.keys()
        assert all(b[t] == Logprob(pytest.approx(a[t].logprob, abs=1e-4), a[t].rank) for t in a)
    assert_all_free(chunked_llm)


def test_a_cached_prompt_is_recomputed_for_its_prompt_logprobs(llm):
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1))  # its blocks are now cached
    (cached,) = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1))
    (scored,) = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    assert cached.num_cached_tokens > 0 and scored.num_cached_tokens == 0
    assert all(e is not None and len(e) == 1 for e in scored.prompt_logprobs[1:])
    assert_all_free(llm)
