"""Tensor and pipeline parallelism on GPUs (NCCL; marked `gpu`, needs 2 GPUs, run on the
device, never in CI): two ranks (TP=2 or PP=2) give the tokens of one, with async scheduling
on (PENDING tokens filled on rank 0's device before the step is broadcast), under preemption,
and across prefill and decode engines of different sizes.

    TRITON_INTERPRET=0 .venv/bin/python -m pytest -q tests/test_tensor_parallel_gpu.py

Each rank runs eager: CUDA graphs around a forward that holds NCCL collectives are not built
yet (EngineCore turns them off for more than one rank)."""

from __future__ import annotations

import os

import pytest
import torch

from services.engine import SamplingParams
from tests.conftest import assert_all_free, make_llm
from tests.test_kv_transfer import GREEDY as KV_GREEDY
from tests.test_kv_transfer import PROMPT as KV_PROMPT
from tests.test_kv_transfer import disaggregated

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="set TRITON_INTERPRET=0 to run GPU tests"),
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

PROMPTS = [list(range(100 + 7 * i, 100 + 7 * i + n)) for i, n in enumerate([5, 40, 77, 130, 16, 260, 1, 33])]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
F32 = dict(dtype="float32", max_model_len=512)


def tokens(llm, prompts=PROMPTS) -> list[list[int]]:
    out = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert_all_free(llm)
    return out


@pytest.fixture(scope="module")
def one():
    return make_llm("tiny-llama", num_kv_blocks=512, **F32)


@pytest.fixture(scope="module")
def two():
    llm = make_llm("tiny-llama", num_kv_blocks=512, tensor_parallel_size=2, **F32)
    yield llm
    llm.close()


def test_two_gpus_give_the_tokens_of_one(one, two):
    assert two.engine.async_scheduling  # on by default on CUDA
    assert tokens(two) == tokens(one)


@pytest.mark.parametrize("preset, tp, pp", [("tiny-qwen3", 2, 1), ("tiny-gpt2", 2, 1), ("tiny-llama", 1, 2),
                                            ("tiny-gpt2", 1, 2)])
def test_each_architecture_on_two_gpus(preset, tp, pp):
    expected = tokens(make_llm(preset, num_kv_blocks=512, **F32))
    llm = make_llm(preset, num_kv_blocks=512, tensor_parallel_size=tp, pipeline_parallel_size=pp, **F32)
    try:
        assert tokens(llm) == expected
    finally:
        llm.close()


def test_preemption_on_two_gpus_gives_the_same_tokens(one):
    llm = make_llm("tiny-llama", num_kv_blocks=24, tensor_parallel_size=2, **F32)
    try:
        assert tokens(llm) == tokens(one)
        assert llm.engine.scheduler.num_preemptions > 0
    finally:
        llm.close()


@pytest.mark.parametrize("prefill_tp2", [True, False])
def test_prefill_and_decode_of_different_sizes_on_gpus(one, two, prefill_tp2):
    prefill, decode = (two, one) if prefill_tp2 else (one, two)
    expected = one.generate(KV_PROMPT, KV_GREEDY)[0].outputs[0].token_ids
    for llm in (one, two):
        llm.engine.block_manager.reset_prefix_cache()
    out, request, _ = disaggregated(prefill, decode, KV_PROMPT, KV_GREEDY)
    assert out.outputs[0].token_ids == expected and request.kv_import.computed_locally == 0

