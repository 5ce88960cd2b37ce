"""Speculative decoding (services/engine/spec/): the output is exactly what decoding without
it gives, for every proposer and architecture, sampled or greedy; rolled-back drafts never
reach the prefix cache; every block comes back; the rejection-sampling rule keeps the
target's distribution."""

from __future__ import annotations

import json

import pytest
import torch

from services.engine import SamplingParams, StructuredOutputParams
from services.engine.errors import ConfigError
from services.engine.spec.config import SpeculativeConfig
from services.engine.spec.ngram import NgramProposer
from services.engine.spec.verify import rejection_sample
from tests.conftest import assert_all_free, make_llm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENGINE = dict(block_size=4, num_kv_blocks=96, max_model_len=256)
PROMPTS = [
    [1, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6],
    [3, 4, 9, 9, 9, 9, 9, 3, 4],
    list(range(10, 40)),
    [7] * 3,
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def greedy(max_tokens: int = 24, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def token_ids(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


def methods(preset: str, dummy_seed: int = 0) -> list[dict]:
    """Every proposer; the draft model is the target itself (same weights)."""
    return [NGRAM, {"method": "self_spec", "num_speculative_tokens": 3, "num_layers": 1},
            {"method": "draft_model", "num_speculative_tokens": 3, "load_format": "dummy", "preset": preset,
             "dummy_seed": dummy_seed}]


# ---- proposers and config ------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_latest_occurrence_of_the_longest_suffix():
    tokens = [5, 1, 2, 4, 9, 2, 4, 6, 1, 2, 4]
    assert NgramProposer(2, 3).propose(tokens, 2) == [9, 2]  # [1, 2, 4] at 1
    assert NgramProposer(2, 2).propose(tokens, 3) == [6, 1, 2]  # [2, 4]: latest at 5
    assert NgramProposer(2, 3).propose(tokens[:4], 2) == []  # [2, 4] never occurred before
    assert NgramProposer(1, 1).propose([3, 8, 3], 4) == [8, 3]  # runs into the suffix itself


def test_speculative_config_takes_vllm_json_and_rejects_what_it_does_not_know():
    cfg = SpeculativeConfig.parse(json.dumps({"method": "ngram", "num_speculative_tokens": 4,
                                              "prompt_lookup_min": 2, "prompt_lookup_max": 5}))
    assert (cfg.method, cfg.num_speculative_tokens, cfg.prompt_lookup_max) == ("ngram", 4, 5)
    for bad, message in [('{"method": "eagle"}', "method"), ('{"method": "ngram", "k": 2}', "unknown"),
                         ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens"),
                         ('{"num_speculative_tokens": 2}', "needs a method"), ("ngram", "not JSON")]:
        with pytest.raises(ConfigError, match=message):
            SpeculativeConfig.parse(bad)
    with pytest.raises(ConfigError, match="num_layers"):
        make_llm("tiny-llama", speculative_config={"method": "self_spec", "num_layers": 2})
    with pytest.raises(ConfigError, match="vocabulary"):
        make_llm("tiny-llama", speculative_config={"method": "draft_model", "load_format": "dummy",
                                                   "preset": "qwen2.5-0.5b"})


# ---- exactness -----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gpt2"])
def test_greedy_tokens_equal_without_speculation_for_every_architecture(preset):
    expected = token_ids(make_llm(preset, **ENGINE).generate(PROMPTS, greedy()))
    for spec in methods(preset):
        llm = make_llm(preset, **ENGINE, speculative_config=spec)
        assert token_ids(llm.generate(PROMPTS, greedy())) == expected, spec["method"]
        stats = llm.engine.speculator.stats
        assert stats.num_draft_tokens > 0, spec["method"]
        if spec["method"] == "draft_model":  # the draft is the target: it guesses every token
            assert stats.num_accepted_tokens == stats.num_draft_tokens
        assert_all_free(llm)


@pytest.mark.slow
def test_speculation_through_the_triton_kernels_is_exact():
    """The GPU's attention kernels (interpreted on the CPU): k+1 positions verified by the
    paged prefill kernel, drafts by the decode kernel."""
    engine = dict(ENGINE, attention_backend="triton")
    expected = token_ids(make_llm("tiny-llama", **engine).generate(PROMPTS[:1], greedy(8)))
    llm = make_llm("tiny-llama", **engine, speculative_config=methods("tiny-llama")[2])
    assert token_ids(llm.generate(PROMPTS[:1], greedy(8))) == expected
    assert llm.engine.speculator.stats.num_accepted_tokens == llm.engine.speculator.stats.num_draft_tokens > 0
    assert_all_free(llm)


def test_a_random_draft_of_another_architecture_is_rejected_and_changes_nothing():
    expected = token_ids(make_llm("tiny-llama", **ENGINE).generate(PROMPTS, greedy()))
    llm = make_llm("tiny-llama", **ENGINE, speculative_config={
        "method": "draft_model", "num_speculative_tokens": 4, "load_format": "dummy", "preset": "tiny-qwen2",
        "dummy_seed": 3})
    assert token_ids(llm.generate(PROMPTS, greedy())) == expected
    stats = llm.engine.speculator.stats
    assert stats.num_draft_tokens > 50 and stats.num_accepted_tokens < stats.num_draft_tokens / 4
    assert_all_free(llm)


def test_a_draft_models_kv_shares_the_pools_memory_budget():
    """The draft's pool has a block for every target block: both come out of --kv-cache-memory
    (on a GPU, the memory budget), not the target's alone and then the draft's on top."""
    from services.engine.kv_sizing import bytes_per_block

    budget = 64 << 20
    plain = make_llm("tiny-llama", kv_cache_memory=budget)
    llm = make_llm("tiny-llama", kv_cache_memory=budget, speculative_config={
        "method": "draft_model", "num_speculative_tokens": 2, "load_format": "dummy", "preset": "tiny-qwen2"})
    target = bytes_per_block(plain.engine.model_config, 16, torch.float32)
    pool, blocks = llm.engine.speculator.proposer.kv_cache, llm.engine.layout.num_kv_blocks
    draft = pool.numel() * pool.element_size() // blocks  # the draft's bytes per block
    assert plain.engine.layout.num_kv_blocks == budget // target
    assert blocks == budget // (target + draft) and blocks * (target + draft) <= budget


def test_seeded_sampling_with_penalties_logprobs_min_tokens_and_n_is_the_same_with_speculation():
    params = SamplingParams(temperature=0.7, top_k=2, seed=11, n=2, max_tokens=20, min_tokens=6, logprobs=2,
                            repetition_penalty=1.3, frequency_penalty=0.4, stop_token_ids=(2, 5), ignore_eos=True)
    expected = make_llm("tiny-llama", **ENGINE).generate(PROMPTS, params)
    llm = make_llm("tiny-llama", **ENGINE, speculative_config=methods("tiny-llama")[2])
    got = llm.generate(PROMPTS, params)
    assert token_ids(got) == token_ids(expected)
    for a, b in zip(got, expected, strict=True):
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            assert [sorted(p) for p in ca.logprobs] == [sorted(p) for p in cb.logprobs]
            for pa, pb in zip(ca.logprobs, cb.logprobs, strict=True):
                assert all(abs(pa[t].logprob - pb[t].logprob) < 1e-4 for t in pa)
    assert llm.engine.speculator.stats.num_accepted_tokens > 0
    assert_all_free(llm)


def test_stop_strings_and_max_tokens_end_a_speculating_sequence_where_they_would_without():
    prompts = ["a b a b a b a b", "1 2 3 1 2 3 1 2 3 1 2"]
    params = [greedy(30, stop=(" b a",)), greedy(7)]
    ref = make_llm("tiny-llama", **ENGINE).generate(prompts * 2, params * 2)
    llm = make_llm("tiny-llama", **ENGINE, speculative_config=methods("tiny-llama")[2])
    out = llm.generate(prompts * 2, params * 2)
    assert [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in out] == \
        [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in ref]
    assert_all_free(llm)


def test_grammar_requests_cut_forbidden_drafts_and_keep_their_tokens():
    params = greedy(24, structured_output=StructuredOutputParams(regex=r"(ab|cd)+x"))
    expected = token_ids(make_llm("tiny-llama", **ENGINE).generate(PROMPTS, params))
    llm = make_llm("tiny-llama", **ENGINE, speculative_config=NGRAM)  # the output repeats: n-grams match
    assert token_ids(llm.generate(PROMPTS, params)) == expected
    assert llm.engine.speculator.stats.num_accepted_tokens > 20
    assert_all_free(llm)
    # The unconstrained self-draft's guesses are all forbidden here: cut before the step.
    llm = make_llm("tiny-llama", **ENGINE, speculative_config=methods("tiny-llama")[1])
    assert token_ids(llm.generate(PROMPTS, params)) == expected
    assert llm.engine.speculator.stats.num_drafts == 0
    assert_all_free(llm)


def test_preemption_under_speculation_recomputes_to_the_same_tokens():
    prompts = [list(range(1 + i, 30 + i)) for i in range(6)]
    expected = token_ids(make_llm("tiny-llama", **ENGINE).generate(prompts, greedy(40)))
    llm = make_llm("tiny-llama", block_size=4, num_kv_blocks=40, max_model_len=128,
                   speculative_config=methods("tiny-llama")[2])
    assert token_ids(llm.generate(prompts, greedy(40))) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert_all_free(llm)


def test_abort_between_speculating_steps_frees_every_block():
    llm = make_llm("tiny-llama", **ENGINE, speculative_config=methods("tiny-llama")[1])
    engine = llm.engine
    for steps in range(1, 6):
        request = engine.add_request(PROMPTS[2], greedy(30, n=2))
        for _ in range(steps):
            engine.step()
        engine.abort(request.request_id)
        assert_all_free(llm)
    assert engine.speculator.stats.num_drafts > 0


def test_only_accepted_tokens_reach_the_prefix_cache():
    """Every block the speculating engine cached holds the KV the plain engine cached under
    the same hash: no rolled-back draft is ever hashed, and its slots were overwritten."""
    ref = make_llm("tiny-llama", **ENGINE)
    spec = make_llm("tiny-llama", **ENGINE, speculative_config=methods("tiny-llama")[1])
    assert token_ids(spec.generate(PROMPTS, greedy(40))) == token_ids(ref.generate(PROMPTS, greedy(40)))
    assert spec.engine.speculator.stats.num_accepted_tokens < spec.engine.speculator.stats.num_draft_tokens
    cached = spec.engine.block_manager._cached
    assert len(cached) > 20 and set(cached) <= set(ref.engine.block_manager._cached)
    for block_hash, block in cached.items():
        mine = spec.engine.runner.kv_cache[:, :, block]
        theirs = ref.engine.runner.kv_cache[:, :, ref.engine.block_manager._cached[block_hash]]
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_no_step_speculates_while_disable_by_batch_size_sequences_run():
    llm = make_llm("tiny-llama", **ENGINE, speculative_config={**methods("tiny-llama")[2], "disable_by_batch_size": 2})
    llm.generate(PROMPTS[:2], greedy())  # two sequences of the same length: never fewer than 2 running
    assert llm.engine.speculator.stats.num_drafts == 0
    llm.generate(PROMPTS[:1], greedy())
    assert llm.engine.speculator.stats.num_drafts > 0


def test_a_request_can_opt_out():
    llm = make_llm("tiny-llama", **ENGINE, speculative_config=methods("tiny-llama")[2])
    llm.generate(PROMPTS, greedy(speculative=False))
    assert llm.engine.speculator.stats.num_drafts == 0
    llm.generate(PROMPTS, greedy())
    assert llm.engine.speculator.stats.num_drafts > 0


# ---- rejection sampling ---------------------------------------------------------------------


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_rejection_sampling_follows_the_target_not_the_draft():
    """Draft tokens drawn from q, verified against p: the first output token is distributed
    as p. Chi-square with 5 degrees of freedom: 20.5 is its 0.999 quantile."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.40, 0.05, 0.30, 0.15, 0.05])
    q = torch.tensor([0.30, 0.10, 0.30, 0.10, 0.10, 0.10])
    rows, k = 40000, 2
    drafts = torch.multinomial(q, rows * k, replacement=True, generator=g).view(rows, k)
    tokens, num_accepted = rejection_sample(p.expand(rows, k + 1, 6), q.expand(rows, k, 6), drafts, g)
    counts = torch.bincount(tokens[:, 0], minlength=6).float()
    assert chi_square(counts, p) < 20.5
    assert chi_square(counts, q) > 1000  # the negative control: this test can tell them apart
    expected_acceptance = float(torch.minimum(p, q).sum())  # P(accept) = sum min(p, q)
    assert abs(float((num_accepted > 0).float().mean()) - expected_acceptance) < 0.01
    # After an accepted first draft, the second output token follows p too.
    second = tokens[num_accepted >= 1, 1]
    assert chi_square(torch.bincount(second, minlength=6).float(), p) < 20.5


def test_rejection_sampling_accepts_every_draft_drawn_from_the_target_itself():
    p = torch.tensor([0.1, 0.6, 0.3])
    drafts = torch.multinomial(p, 300, replacement=True, generator=torch.Generator().manual_seed(1)).view(100, 3)
    _, num_accepted = rejection_sample(p.expand(100, 4, 3), p.expand(100, 3, 3), drafts)
    assert bool((num_accepted == 3).all())


# ---- the default model ----------------------------------------------------------------------

PASSAGE = ("The old lighthouse stood on the northern cliff for two hundred years. Every night the keeper "
           "climbed the spiral stairs, trimmed the wick and polished the great lens.")
COPY_PROMPTS = [
    f"Repeat the passage below word for word.\n\n{PASSAGE}\n\nRepeated:\n",
    "def add_numbers(first_number, second_number):\n    return first_number + second_number\n\n"
    "def subtract_numbers(first_number, second_number):\n",
]
OPEN_PROMPTS = ["What is AI?", "Once upon a time, in a land far away,", "List three primary colors:"]


@pytest.mark.slow
@pytest.mark.parametrize("spec", [{"method": "ngram", "num_speculative_tokens": 4},
                                  {"method": "self_spec", "num_speculative_tokens": 2, "num_layers": 20}])
def test_default_model_greedy_tokens_are_the_same_with_speculation(default_llm, spec):
    from services.engine import LLM

    prompts, params = COPY_PROMPTS + OPEN_PROMPTS[:1], greedy(32, stop=("\n\n\n",))
    expected = [(o.outputs[0].token_ids, o.outputs[0].text) for o in default_llm.generate(prompts, params)]
    llm = LLM(max_model_len=1024, speculative_config=spec)
    assert [(o.outputs[0].token_ids, o.outputs[0].text) for o in llm.generate(prompts, params)] == expected
    stats = llm.engine.speculator.stats
    assert stats.num_accepted_tokens > 10, stats  # the real model accepts drafts
    assert_all_free(llm)


def test_spec_decode_metrics_carry_the_engines_totals_with_vllms_names():
    from prometheus_client import REGISTRY

    from services.rpc import metrics
    from services.engine.spec.speculator import SpecStats

    def value(name, **labels):
        return REGISTRY.get_sample_value(f"pdserve:spec_decode_{name}_total", labels) or 0.0

    before = [value("num_drafts"), value("num_draft_tokens"), value("num_accepted_tokens"),
              value("num_accepted_tokens_per_pos", position="1")]
    counters = metrics.SpecDecodeCounters()
    counters.export(SpecStats(3, 9, 5, [3, 2, 0], [3, 3, 3]))
    counters.export(SpecStats(4, 12, 7, [4, 3, 0], [4, 4, 4]))
    after = [value("num_drafts"), value("num_draft_tokens"), value("num_accepted_tokens"),
             value("num_accepted_tokens_per_pos", position="1")]
    assert [a - b for a, b in zip(after, before, strict=True)] == [4, 12, 7, 3]
