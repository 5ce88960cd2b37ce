"""Seeded requests through the whole engine: the same seed gives the same tokens whatever else
is batched with the request, with async scheduling on or off, and after preemption; another
seed gives other tokens. Penalised requests stay in flight under async scheduling (their
counts live on the device) and give the same tokens as without it."""

from __future__ import annotations

import pytest

from services.engine import SamplingParams
from tests.conftest import assert_all_free, make_llm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = [5 + 11 * j for j in range(17)]
OTHERS = [[300 + 7 * i + j for j in range(5 + 9 * i)] for i in range(6)]
KINDS = {
    "temperature 0.6": dict(temperature=0.6),
    "top_p top_k": dict(temperature=0.8, top_p=0.9, top_k=50),
    "penalties": dict(temperature=0.7, repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.2),
    "min_p": dict(temperature=1.2, min_p=0.05),
    "top_p alone": dict(temperature=1.0, top_p=0.8),
}


def seeded(kind: str, seed: int = 1234, tokens: int = 24) -> SamplingParams:
    return SamplingParams(seed=seed, max_tokens=tokens, ignore_eos=True, **KINDS[kind])


def neighbours() -> list[SamplingParams]:
    """Unseeded, greedy and other seeds beside the request under test."""
    return [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
            SamplingParams(temperature=0.9, top_k=5, seed=7, max_tokens=30, ignore_eos=True),
            SamplingParams(temperature=0.5, repetition_penalty=1.3, max_tokens=15, ignore_eos=True),
            SamplingParams(temperature=1.0, top_p=0.5, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=0.7, n=2, seed=3, max_tokens=10, ignore_eos=True)]


def tokens_of(llm, prompts, params, at: int = 0) -> list[int]:
    return llm.generate(prompts, params)[at].outputs[0].token_ids


@pytest.fixture(scope="module")
def alone() -> dict[str, list[int]]:
    llm = make_llm("tiny-llama", num_kv_blocks=512, async_scheduling=False)
    return {kind: tokens_of(llm, [PROMPT], [seeded(kind)]) for kind in KINDS}


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_seeded_tokens_do_not_depend_on_the_batch_or_async_scheduling(alone, async_scheduling):
    llm = make_llm("tiny-llama", num_kv_blocks=512, async_scheduling=async_scheduling, max_num_batched_tokens=32)
    for i, kind in enumerate(KINDS):
        prompts = OTHERS[:i] + [PROMPT] + OTHERS[i:]  # another position in the batch for each kind
        params = neighbours()[:i] + [seeded(kind)] + neighbours()[i:]
        assert tokens_of(llm, prompts, params, at=i) == alone[kind], kind
    assert_all_free(llm)


def test_seeded_tokens_survive_preemption(alone):
    llm = make_llm("tiny-llama", num_kv_blocks=20, block_size=4, max_model_len=64, async_scheduling=True)
    prompts = [PROMPT] + [p[:16] for p in OTHERS[1:6]]
    for kind in ("temperature 0.6", "penalties", "top_p alone"):
        params = [seeded(kind)] + [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)] * 5
        before = llm.engine.scheduler.num_preemptions
        assert tokens_of(llm, prompts, params) == alone[kind], kind
        assert llm.engine.scheduler.num_preemptions > before  # the case is what it says
    assert_all_free(llm)


def test_other_seeds_give_other_tokens(alone):
    llm = make_llm("tiny-llama", num_kv_blocks=512)
    for kind in KINDS:
        others = {tuple(tokens_of(llm, [PROMPT], [seeded(kind, seed=s)])) for s in (1, 2, 3)}
        assert tuple(alone[kind]) not in others and len(others) == 3, kind


def test_a_penalised_request_stays_in_flight_under_async_scheduling():
    llm = make_llm("tiny-llama", num_kv_blocks=512, async_scheduling=True)
    engine = llm.engine
    engine.add_request(PROMPT, seeded("penalties", tokens=6))
    engine.step()
    assert engine.has_step_in_flight  # no read-back forced: the counts are on the device
    while engine.has_unfinished():
        engine.step()
    assert_all_free(llm)
