"""The fp8 KV cache on a GPU (marked `gpu`; run with TRITON_INTERPRET=0 on the device): the
compiled Triton cache write stores the torch reference's bytes (rounding included, which the
CPU interpreter gets wrong), both attention kernels read fp8 pools in the engine's head-major
layout with bf16 queries, CUDA graphs replay fp8 steps with the eager tokens, the profiled
pool holds about twice bf16's blocks, and the default model's perplexity stays within 3% of a
bf16 cache's."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from kernels.cache import FP8, from_cache, reshape_and_cache, reshape_and_cache_ref, to_cache
from kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref
from kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from services.engine import LLM, SamplingParams
from tests.conftest import assert_all_free, make_llm
from tests.test_kv_fp8 import PASSAGE, perplexity

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                                  reason="set TRITON_INTERPRET=0 to run GPU tests")]
CUDA = "cuda"


def head_major_fp8_pool(lens, kvh, scale, seed=0):
    """An fp8 pool stored as the engine stores it on a GPU ([blocks, kvh, page, d] viewed as
    [blocks, page, kvh, d]), its bf16 dequantized twin and the block tables."""
    g = torch.Generator().manual_seed(seed)
    blocks = sum(-(-n // 16) for n in lens) + 2
    tables, start = [], 0
    width = max(-(-n // 16) for n in lens)
    for n in lens:
        nb = -(-n // 16)
        tables.append(list(range(start, start + nb)) + [0] * (width - nb))
        start += nb
    caches = []
    for s in scale:
        x = torch.randn(blocks, kvh, 16, 64, generator=g).to(CUDA) * 4
        caches.append(to_cache(x, FP8, s).transpose(1, 2))
    deq = [from_cache(c, torch.bfloat16, s) for c, s in zip(caches, scale)]
    return caches, deq, torch.tensor(tables, dtype=torch.int32, device=CUDA)


@pytest.mark.parametrize("scale", [(1.0, 1.0), (0.05, 0.02)])
def test_compiled_write_stores_the_references_bytes_rounding_included(scale):
    g = torch.Generator().manual_seed(0)
    key = (torch.randn(64, 8, 128, generator=g) * 30).to(CUDA, torch.bfloat16)
    value = (torch.randn(64, 8, 128, generator=g) * 3).to(CUDA, torch.bfloat16)
    slots = torch.randperm(256, generator=g)[:64].to(CUDA)
    slots[5] = -1
    pools = [[torch.zeros(16, 16, 8, 128, dtype=FP8, device=CUDA) for _ in range(2)] for _ in range(2)]
    reshape_and_cache_ref(key, value, *pools[0], slots, *scale)
    reshape_and_cache(key, value, *pools[1], slots, *scale)
    for ref, out in zip(*pools):
        assert torch.equal(ref.view(torch.uint8), out.view(torch.uint8))
        assert not out.float().isnan().any()


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_kernel_reads_a_head_major_fp8_pool_with_bf16_queries(num_splits):
    lens, scale = [1, 17, 300, 1000], (0.5, 0.25)
    (k8, v8), (k, v), bt = head_major_fp8_pool(lens, 8, scale)
    q = torch.randn(len(lens), 32, 64, device=CUDA).to(torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=CUDA)
    ref = paged_decode_attention_ref(q.float(), k.float(), v.float(), bt, seq_lens, 0.125)
    out = paged_decode_attention(q, k8, v8, bt, seq_lens, 0.125, num_splits=num_splits, k_scale=scale[0],
                                 v_scale=scale[1])
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_prefill_kernel_reads_a_head_major_fp8_pool_with_bf16_queries():
    lens, scale = [40, 300, 129], (2.0, 0.5)
    (k8, v8), (k, v), bt = head_major_fp8_pool(lens, 8, scale)
    starts = torch.tensor([0, 40, 140, 141], dtype=torch.int32, device=CUDA)  # 40 (whole), 100, 1 new tokens
    q = torch.randn(141, 32, 64, device=CUDA).to(torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=CUDA)
    ref = paged_prefill_attention_ref(q.float(), k.float(), v.float(), bt, starts, seq_lens, 0.125)
    out = paged_prefill_attention(q, k8, v8, bt, starts, seq_lens, 0.125, k_scale=scale[0], v_scale=scale[1])
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_cuda_graphs_replay_fp8_steps_with_the_eager_tokens():
    prompts = [list(range(100 + 7 * i, 100 + 7 * i + n)) for i, n in enumerate([5, 40, 130, 16, 260, 1])]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    runs = []
    for eager in (True, False):
        llm = make_llm("tiny-llama", num_kv_blocks=512, kv_cache_dtype="fp8", enforce_eager=eager)
        assert llm.engine.runner.kv_cache.dtype == FP8
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, greedy)])
        assert_all_free(llm)
    assert runs[0] == runs[1]


def test_the_profiled_pool_holds_about_twice_bf16s_blocks():
    """Each engine is dropped before the next is sized: a live one's pool would count as held."""
    blocks = []
    for kv_cache_dtype in ("auto", "fp8"):
        llm = make_llm("tiny-llama", gpu_memory_utilization=0.5, kv_cache_dtype=kv_cache_dtype)
        blocks.append(llm.engine.layout.num_kv_blocks)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    assert 1.9 <= blocks[1] / blocks[0] <= 2.02, blocks


def test_default_model_perplexity_with_an_fp8_cache_is_within_3_percent_of_bf16():
    text = PASSAGE.read_text()
    ppl = {d: perplexity(LLM(max_model_len=512, num_kv_blocks=64, kv_cache_dtype=d), text) for d in ("auto", "fp8")}
    assert abs(ppl["fp8"] / ppl["auto"] - 1) <= 0.03, ppl
