"""Tensor and pipeline parallelism on the CPU (gloo): the same greedy tokens, logprobs and block
accounting as one process, for every architecture; shapes that do not split are refused; a rank
that dies fails the engine's next step instead of hanging it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest

from services.engine import LLM, AsyncEngine
from services.engine.errors import ConfigError
from services.engine.models.config import ModelConfig
from services.engine.parallel.driver import RankDiedError
from services.engine.parallel.shard import Shard
from services.engine.presets import preset_config
from services.engine.sampling_params import SamplingParams
from tests.conftest import assert_all_free, make_llm
from tests.test_kv_transfer import GREEDY as KV_GREEDY
from tests.test_kv_transfer import PROMPT as KV_PROMPT
from tests.test_kv_transfer import count_computed, disaggregated

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHARED = list(range(100, 140))  # two and a half blocks: a later prompt hits its first two in the cache
PROMPTS = [SHARED, [5, 6, 7], SHARED + [7, 8, 9, 10], list(range(300, 333))]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)


def run(llm, prompts=PROMPTS, params=GREEDY):
    """Tokens, chosen-token logprobs and prefix-cache hits of two batches (the second's
    prompts may hit the first's blocks in the prefix cache), then the pool check."""
    outs = llm.generate(prompts[:2], params) + llm.generate(prompts[2:], params)
    assert_all_free(llm)
    tokens = [o.outputs[0].token_ids for o in outs]
    logprobs = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    return tokens, logprobs, [o.num_cached_tokens for o in outs]


def assert_same(a, b):
    tokens_a, logprobs_a, cached_a = a
    tokens_b, logprobs_b, cached_b = b
    assert tokens_a == tokens_b
    assert cached_a == cached_b
    for x, y in zip(logprobs_a, logprobs_b):
        assert x == pytest.approx(y, abs=1e-4)


# Every architecture's shard code once (each engine started costs seconds of imports per rank):
# Qwen3 (q/k norms, head_dim apart from hidden/heads) is preempting_pair's TP=2 engine.
@pytest.mark.parametrize("preset, tp, pp", [
    ("tiny-qwen2", 2, 1),  # the QKV bias split by heads, a tied LM head
    ("tiny-gpt2", 2, 1),  # GPT-2's fused c_attn (Conv1D, transposed) split into q, k, v
    ("tiny-gpt2", 1, 2),  # a stage boundary in GPT-2; in the Llama file (its residual stream) below
    ("tiny-llama", 2, 2),  # TP x PP, 4 ranks: Llama TP and an untied LM head on stage 0
])
def test_parallel_ranks_give_the_tokens_and_logprobs_of_one(preset, tp, pp):
    one = make_llm(preset, num_kv_blocks=64)
    expected = run(one)
    two = make_llm(preset, num_kv_blocks=64, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        got = run(two)
        assert got[2][2] == 32  # the shared prefix was served from the cache
        assert_same(got, expected)
        # a KV block read from every rank is the single engine's; written back, each rank keeps its part
        (_, block), (_, block_two) = prefilled_block(one, KV_PROMPT), prefilled_block(two, KV_PROMPT)
        assert block_two == block
        whole = one.engine.runner.read_block(block, 16)
        assert two.engine.runner.read_block(block, 16).allclose(whole, atol=1e-5)
        two.engine.runner.write_block(block, whole * 2)
        assert two.engine.runner.read_block(block, 16).equal(whole * 2)
        finish(one)
        finish(two)
    finally:
        two.close()


def test_a_follower_builds_its_part_from_rank_0s_source_without_importing_transformers():
    """Rank 0 sends its resolved source as JSON (loader.source_to_json); a follower of a
    default-RoPE SiLU or GPT-2 model then builds its part without transformers' imports
    (about a second of each rank's start-up)."""
    from services.engine import loader

    sources = [loader.source_to_json(loader.resolve(None, "dummy", p)) for p in ("tiny-qwen3", "tiny-gpt2")]
    build = "\n".join([
        "import json, sys, torch",
        "from services.engine import loader",
        "from services.engine.parallel.follower import ModelConfig, _load_model",
        "for text in json.load(sys.stdin):",
        "    source = loader.source_from_json(text)",
        "    cfg = ModelConfig.from_hf(source.hf_config)",
        "    print(cfg.model_type, type(_load_model(cfg, source, torch.device('cpu'), torch.float32, 64)).__name__)",
        "print('transformers' in sys.modules)",
    ])
    out = subprocess.run([sys.executable, "-c", build], input=json.dumps(sources), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["qwen3", "LlamaForCausalLM", "gpt2", "GPT2LMHeadModel", "False"]


def test_kv_heads_are_replicated_when_ranks_outnumber_them():
    cfg = ModelConfig.from_hf(preset_config("tiny-llama"))
    assert cfg.num_kv_heads == 2
    assert [Shard(r, 4).kv_heads(cfg) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert Shard(0, 4).kv_owners(cfg) == [0, 2]
    assert Shard(1, 2).kv_heads(cfg) == range(1, 2) and Shard(0, 2).kv_owners(cfg) == [0, 1]


def test_refuses_head_counts_that_do_not_divide_before_starting_any_rank():
    # the default model's shape: 9 query heads, 3 KV heads
    with pytest.raises(ConfigError, match="does not divide the model's 9 attention heads"):
        make_llm("smollm2-135m", num_kv_blocks=8, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="pipeline_parallel_size 3 does not divide the model's 2 layers"):
        make_llm(pipeline_parallel_size=3)
    with pytest.raises(ConfigError, match="tensor_parallel_size and pipeline_parallel_size must be >= 1"):
        make_llm(tensor_parallel_size=0)


DEFAULT_PROMPTS = ["What is AI?", "The capital of France is", [1, 2, 3]]
DEFAULT_GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def default_expected(default_llm):
    return run(default_llm, DEFAULT_PROMPTS, DEFAULT_GREEDY)


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(3, 1), (1, 2)])
def test_the_default_model_on_several_ranks_gives_the_tokens_of_one(default_expected, tp, pp):
    """SmolLM2-135M's real weights: at TP=3 each rank holds 3 of the 9 query heads and one
    of the 3 KV heads; at PP=2 each stage holds 15 of the 30 layers."""
    several = LLM(max_model_len=256, kv_cache_memory=16 << 20, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        assert_same(run(several, DEFAULT_PROMPTS, DEFAULT_GREEDY), default_expected)
    finally:
        several.close()


@pytest.fixture(scope="module")
def preempting_pair():
    """tiny-qwen3 at TP=1 and TP=2 with a pool too small for the second batch: preemption,
    prefix caching and forks (n=2) on both. Qwen3's per-head q/k norms and 32-wide heads (not
    hidden / heads) are the Llama file's least common shapes, so its TP=2 runs here."""
    small = dict(num_kv_blocks=7, max_model_len=112)
    one = make_llm("tiny-qwen3", **small)
    two = make_llm("tiny-qwen3", tensor_parallel_size=2, **small)
    yield one, two
    two.close()


def test_preemption_and_forks_are_the_same_with_two_ranks(preempting_pair):
    one, two = preempting_pair
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    expected = run(one, PROMPTS, params)
    got = run(two, PROMPTS, params)
    assert one.engine.scheduler.num_preemptions > 0
    assert two.engine.scheduler.num_preemptions == one.engine.scheduler.num_preemptions
    assert_same(got, expected)
    forked = SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=20, ignore_eos=True)  # copy-on-write block copies
    a = one.generate([SHARED[:20]], forked)[0]
    b = two.generate([SHARED[:20]], forked)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert_all_free(one)
    assert_all_free(two)


def prefilled_block(llm, prompt):
    """A request whose prompt is prefilled (and not yet finished), and its first block id."""
    request = llm.engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    llm.engine.step()
    return request, request.seqs[0].block_table[0]


def finish(llm):
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert_all_free(llm)


def test_kv_blocks_read_from_two_ranks_hold_every_head_and_write_back_to_them(preempting_pair):
    one, two = preempting_pair
    prompt = list(range(1, 19))  # one full block and two tokens
    _, block = prefilled_block(one, prompt)
    _, block_two = prefilled_block(two, prompt)
    assert block_two == block  # rank 0's block manager decides for every rank
    whole = one.engine.runner.read_block(block, 16)
    from_two = two.engine.runner.read_block(block, 16)
    assert from_two.shape == whole.shape == (2, 2, 16, 2, 32)  # layers, K/V, tokens, KV heads, head dim
    assert from_two.allclose(whole, atol=1e-5)
    swapped = whole.flip(3)  # heads swapped: each rank now holds what the other held
    two.engine.runner.write_block(block, swapped)
    assert two.engine.runner.read_block(block, 16).equal(swapped)
    assert two.engine.runner.kv_cache[:, :, block, :16].equal(swapped[:, :, :, :1])  # rank 0 kept head 0
    finish(one)
    finish(two)


@pytest.mark.parametrize("direction", ["prefill TP=2, decode TP=1", "prefill TP=1, decode TP=2"])
def test_prefill_and_decode_with_different_tp_sizes_give_the_local_tokens(preempting_pair, direction):
    one, two = preempting_pair
    prefill, decode = (two, one) if direction.startswith("prefill TP=2") else (one, two)
    for llm in (one, two):
        llm.engine.block_manager.reset_prefix_cache()
    expected = one.generate(KV_PROMPT, KV_GREEDY)[0].outputs[0].token_ids
    one.engine.block_manager.reset_prefix_cache()
    computed = count_computed(decode)
    out, request, blocks = disaggregated(prefill, decode, KV_PROMPT, KV_GREEDY)
    del decode.engine.runner.execute  # count_computed's wrapper
    assert out.outputs[0].token_ids == expected
    assert [b.num_tokens for b in blocks] == [16, 16, 5]
    assert all(b.tensor.shape[3] == 2 for b in blocks)  # every KV head, whichever ranks held them
    assert computed == [1] * 11 and request.kv_import.computed_locally == 0
    assert_all_free(prefill)
    assert_all_free(decode)


def test_a_killed_rank_fails_the_next_step_instead_of_hanging(preempting_pair):
    """Last in this module: it ends the pair's second rank."""
    _, two = preempting_pair
    follower = two.engine._followers.procs[0]
    os.kill(follower.pid, signal.SIGKILL)
    follower.wait()
    with pytest.raises(RankDiedError, match="rank 1 is gone"):
        two.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4))
    # An engine on a thread of the worker (--engine-process off) learns of it without a step.
    engine = AsyncEngine(core=two.engine)

    async def died():
        return await asyncio.wait_for(engine.death(), timeout=60)

    assert isinstance(asyncio.run(died()), RankDiedError)
    assert isinstance(engine.dead, RankDiedError)
