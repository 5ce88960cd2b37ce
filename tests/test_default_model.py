"""The real default model (SmolLM2-135M-Instruct): token-for-token equal to transformers,
and the same tokens however the engine batches, chunks or preempts."""

from __future__ import annotations

import pytest
import torch

from services.engine import LLM, SamplingParams
from tests.conftest import assert_all_free

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is AI?",
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "List three primary colors:",
    "Translate to French: Good morning, how are you?",
    "The quick brown fox",
    "In 1969, the first humans landed on",
    "import numpy as np\nx = np.arange(10)\n",
    "Photosynthesis is the process by which plants",
    "Q: What is 12 times 12?\nA:",
    "Écrivez une phrase sur la mer.",
]
GREEDY_32 = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(default_llm, hf_default_model):
    """HF transformers' greedy continuation of each prompt (float32, no EOS)."""
    tok = default_llm.tokenizer
    refs = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([tok.encode(prompt)])
            out = hf_default_model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=2)
            refs.append(out[0, ids.shape[1] :].tolist())
    return refs


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_tokens_equal_transformers_generate(default_llm, reference):
    assert all(len(set(ref)) >= 8 for ref in reference), "reference output is degenerate"
    assert token_ids(default_llm.generate(PROMPTS, GREEDY_32)) == reference
    assert_all_free(default_llm)


def test_one_at_a_time_equals_all_together(default_llm, reference):
    alone = [default_llm.generate(p, GREEDY_32)[0].outputs[0].token_ids for p in PROMPTS]
    assert alone == reference
    assert_all_free(default_llm)


def test_tiny_token_budget_forces_chunked_prefill_with_the_same_tokens(reference):
    llm = LLM(max_model_len=256, max_num_batched_tokens=8)
    steps = []
    original = llm.engine.runner.execute
    llm.engine.runner.execute = lambda plan, *hook: steps.append(plan.num_tokens) or original(plan, *hook)
    assert token_ids(llm.generate(PROMPTS, GREEDY_32)) == reference
    assert max(steps) == 8  # every step was cut by the budget at some point
    assert_all_free(llm)


def test_tiny_block_pool_forces_preemption_with_the_same_tokens(reference):
    llm = LLM(max_model_len=64, num_kv_blocks=8, block_size=8)
    assert token_ids(llm.generate(PROMPTS, GREEDY_32)) == reference
    assert llm.engine.scheduler.num_preemptions > 0
    assert_all_free(llm)


def test_seeded_sampling_is_the_same_alone_batched_and_preempted(default_llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = default_llm.generate(PROMPTS[0], params)[0].outputs[0].token_ids
    crowd = [SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)] * (len(PROMPTS) - 1)
    batched = default_llm.generate(PROMPTS, [params, *crowd])[0].outputs[0].token_ids
    small = LLM(max_model_len=64, num_kv_blocks=8, block_size=8)
    preempted = small.generate(PROMPTS, [params, *crowd])[0].outputs[0].token_ids
    assert small.engine.scheduler.num_preemptions > 0
    assert alone == batched == preempted
    assert alone != default_llm.generate(PROMPTS[0], GREEDY_32)[0].outputs[0].token_ids[:24]
    assert_all_free(default_llm)
    assert_all_free(small)


def test_text_is_the_detokenized_tokens(default_llm):
    out = default_llm.generate("What is AI?", SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert out.text == default_llm.tokenizer.decode(out.token_ids)
    assert out.text.startswith(" AI refers to machines")


def test_chat_template_prompt_stops_at_end_of_turn(default_llm):
    ids = default_llm.tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}])
    out = default_llm.generate(ids, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] == 2  # <|im_end|>, the model's EOS
    assert "<|im_end|>" not in out.text
    ignoring = default_llm.generate(ids, SamplingParams(temperature=0, max_tokens=len(out.token_ids) + 4, ignore_eos=True))
    assert ignoring[0].outputs[0].token_ids[: len(out.token_ids)] == out.token_ids
    assert ignoring[0].outputs[0].finish_reason == "length"
    assert_all_free(default_llm)


def test_prefix_cache_hit_gives_the_same_tokens_and_is_reported(default_llm, reference):
    prefix = "You are a helpful assistant. Answer briefly and precisely. " * 3
    first = default_llm.generate(prefix + PROMPTS[0], GREEDY_32)[0]
    second = default_llm.generate(prefix + PROMPTS[0], GREEDY_32)[0]
    assert second.num_cached_tokens >= 16 and second.num_cached_tokens % 16 == 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert_all_free(default_llm)
