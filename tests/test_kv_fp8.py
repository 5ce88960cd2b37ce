"""The fp8 KV cache (--kv-cache-dtype fp8): e4m3 K and V with per-layer scales, written and
read by the torch reference and (through Triton's interpreter) the Triton kernels; a pool of
twice bf16's tokens; blocks and their scales on the wire and through disaggregation; and the
default model's perplexity on a fixed passage within 3% of an fp32 cache's. GPU runs of the
kernels and the engine: tests/test_kv_fp8_gpu.py."""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import grpc  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.cache import FP8, from_cache, reshape_and_cache, reshape_and_cache_ref, to_cache  # noqa: E402
from kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref  # noqa: E402
from kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref  # noqa: E402
from services.engine import LLM, SamplingParams  # noqa: E402
from services.engine.block_hash import hash_blocks  # noqa: E402
from services.engine.config import EngineConfig  # noqa: E402
from services.engine.errors import ConfigError  # noqa: E402
from services.engine.kv_sizing import bytes_per_block  # noqa: E402
from services.engine.kv_transfer import BlockData, BlockRef, KVTransferError  # noqa: E402
from services.kv import wire  # noqa: E402
from tests.conftest import assert_all_free, make_llm  # noqa: E402
from tests.test_kernels_attention import paged_kv  # noqa: E402
from tests import test_kv_cuda_ipc  # noqa: E402
from tests.test_kv_cuda_ipc import decode_request, generate, own_pool, until, workers  # noqa: E402
from tests.test_kv_transfer import GREEDY  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

cpu_pool_exported = test_kv_cuda_ipc.cpu_pool_exported  # a fixture: prefill offers its CPU pool "by reference"
PASSAGE = Path(__file__).parent / "data" / "kv_fp8_passage.txt"
PROMPT = list(range(1000, 1150))  # 150 tokens: 9 full blocks and a partial one


def fp8_pool(lens, kvh, dtype, seed=0, scale=(1.0, 1.0)):
    """paged_kv's pool quantized to fp8 with (K, V) scales, and the same values dequantized."""
    k, v, bt = paged_kv(lens, 16, kvh, 64, torch.float32, seed=seed)
    k8, v8 = to_cache(k * 3, FP8, scale[0]), to_cache(v * 3, FP8, scale[1])
    return k8, v8, from_cache(k8, dtype, scale[0]), from_cache(v8, dtype, scale[1]), bt


# ---- the cache write ------------------------------------------------------------------------------


def test_fp8_write_divides_by_the_scale_and_saturates_instead_of_nan():
    key = torch.tensor([[[1.0, -3.0, 1000.0, -1e6]]])  # [T=1, KVH=1, D=4]
    k_cache = torch.zeros(2, 4, 1, 4, dtype=FP8)
    v_cache = torch.zeros_like(k_cache)
    reshape_and_cache_ref(key, key, k_cache, v_cache, torch.tensor([5]), k_scale=2.0, v_scale=1.0)
    assert k_cache[1, 1, 0].float().tolist() == [0.5, -1.5, 448.0, -448.0]
    assert v_cache[1, 1, 0].float().tolist() == [1.0, -3.0, 448.0, -448.0]
    assert from_cache(k_cache[1, 1, 0], torch.float32, 2.0).tolist() == [1.0, -3.0, 896.0, -896.0]
    assert k_cache[0].float().abs().sum() == 0 and k_cache[1, 0].float().abs().sum() == 0


@pytest.mark.parametrize("scale", [(1.0, 1.0), (0.05, 0.02)])
def test_triton_write_stores_the_references_bytes(scale):
    """Values that are e4m3 numbers once scaled, some past +-448: the interpreter's fp32 -> fp8
    cast rounds wrongly across a power of two (7.8 -> 4), so rounding itself is checked on the
    GPU only (tests/test_kv_fp8_gpu.py); scaling, saturation and slots are checked here."""
    g = torch.Generator().manual_seed(0)
    key, value = (to_cache(torch.randn(6, 3, 64, generator=g) * 200, FP8).float() * (2 * s) for s in scale)
    slots = torch.tensor([3, 17, -1, 0, 40, 41])  # -1: padding, left untouched
    caches = [[torch.zeros(4, 16, 3, 64, dtype=FP8) for _ in range(2)] for _ in range(2)]
    reshape_and_cache_ref(key, value, *caches[0], slots, *scale)
    reshape_and_cache(key, value, *caches[1], slots, *scale)
    for ref, out in zip(caches[0], caches[1]):
        assert torch.equal(ref.view(torch.uint8), out.view(torch.uint8))
    assert caches[0][0].view(torch.uint8).count_nonzero() > 5 * 3 * 60  # five tokens written
    assert (caches[0][0].float().abs() == 448).any()  # some saturated


def test_the_cpu_read_of_fp8_equals_torchs_cast_for_every_finite_code():
    codes = torch.arange(256, dtype=torch.uint8).view(FP8)
    finite = ~codes.float().isnan()
    assert finite.sum() == 254
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(from_cache(codes, dtype)[finite], codes.to(dtype)[finite])
        assert torch.equal(from_cache(codes, dtype, 0.5)[finite], codes.to(dtype)[finite] * 0.5)


# ---- attention over an fp8 cache ------------------------------------------------------------------


def test_references_read_an_fp8_cache_as_its_dequantized_values():
    lens, scale = [1, 17, 40], (0.5, 0.25)
    k8, v8, k, v, bt = fp8_pool(lens, 3, torch.float32, scale=scale)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(3, 9, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(paged_decode_attention_ref(q, k8, v8, bt, seq_lens, 0.125, *scale),
                               paged_decode_attention_ref(q, k, v, bt, seq_lens, 0.125), atol=1e-6, rtol=1e-6)
    starts = torch.tensor([0, 1, 6, 16], dtype=torch.int32)  # chunks of 1, 5 and 10 tokens
    qp = torch.randn(16, 9, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(paged_prefill_attention_ref(qp, k8, v8, bt, starts, seq_lens, 0.125, *scale),
                               paged_prefill_attention_ref(qp, k, v, bt, starts, seq_lens, 0.125),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_kernel_reads_fp8_like_the_reference(dtype, num_splits):
    lens, scale = [1, 17, 130, 64], (0.5, 2.0)
    k8, v8, k, v, bt = fp8_pool(lens, 2, dtype, scale=scale)
    q = torch.randn(len(lens), 8, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    ref = paged_decode_attention_ref(q.float(), k.float(), v.float(), bt, seq_lens, 0.125)
    out = paged_decode_attention(q, k8, v8, bt, seq_lens, 0.125, num_splits=num_splits, k_scale=scale[0],
                                 v_scale=scale[1])
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_kernel_reads_fp8_like_the_reference(dtype):
    lens, scale = [9, 40, 70], (2.0, 0.5)  # chunks of 9 (whole prompt), 20 and 3 tokens
    k8, v8, k, v, bt = fp8_pool(lens, 2, dtype, scale=scale)
    starts = torch.tensor([0, 9, 29, 32], dtype=torch.int32)
    q = torch.randn(32, 4, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    ref = paged_prefill_attention_ref(q.float(), k.float(), v.float(), bt, starts, seq_lens, 0.125)
    out = paged_prefill_attention(q, k8, v8, bt, starts, seq_lens, 0.125, k_scale=scale[0], v_scale=scale[1])
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


# ---- configuration and sizing ---------------------------------------------------------------------


def test_an_unknown_kv_cache_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="kv_cache_dtype must be auto or fp8"):
        EngineConfig(kv_cache_dtype="int4")


def test_the_flag_reaches_the_config_and_child_processes():
    import argparse

    from services.cli.model_args import add_model_args, engine_config, model_argv

    p = argparse.ArgumentParser()
    add_model_args(p)
    args = p.parse_args(["--kv-cache-dtype", "fp8"])
    assert engine_config(args).kv_cache_dtype == "fp8"
    argv = model_argv(args)
    assert argv[argv.index("--kv-cache-dtype") + 1] == "fp8"
    assert engine_config(p.parse_args([])).resolve_kv_dtype(torch.bfloat16) == torch.bfloat16


def test_the_same_memory_holds_twice_bf16s_tokens_and_four_times_fp32s(fp8_decode):
    cfg = fp8_decode.engine.model_config
    assert 2 * bytes_per_block(cfg, 16, FP8) == bytes_per_block(cfg, 16, torch.bfloat16)
    budget = 64 * bytes_per_block(cfg, 16, torch.float32)
    fp32 = make_llm("tiny-llama", kv_cache_memory=budget)
    fp8 = make_llm("tiny-llama", kv_cache_memory=budget, kv_cache_dtype="fp8")
    assert fp32.engine.layout.num_kv_blocks == 64 and fp8.engine.layout.num_kv_blocks == 256
    pool = fp8.engine.runner.kv_cache
    assert pool.dtype == FP8 and pool.numel() * pool.element_size() == budget


def test_prefix_hits_and_chunking_give_the_same_tokens_on_an_fp8_cache():
    """Hashes and block accounting do not depend on the cache dtype: a repeated prompt hits
    its cached blocks, and a prompt prefilled in 16-token chunks (each chunk reading the
    earlier ones back from fp8) gives the one-chunk tokens."""
    whole = make_llm("tiny-llama", num_kv_blocks=64, kv_cache_dtype="fp8")
    chunked = make_llm("tiny-llama", num_kv_blocks=64, kv_cache_dtype="fp8", max_num_batched_tokens=16)
    first = whole.generate(PROMPT, GREEDY)[0]
    again = whole.generate(PROMPT, GREEDY)[0]
    assert again.num_cached_tokens == 144 and again.outputs[0].token_ids == first.outputs[0].token_ids
    assert chunked.generate(PROMPT, GREEDY)[0].outputs[0].token_ids == first.outputs[0].token_ids
    assert_all_free(whole)
    assert_all_free(chunked)


# ---- the wire --------------------------------------------------------------------------------------

SHAPE = (2, 2, 16, 3, 8)  # [layers, 2, block_size, kv_heads, head_dim]


def fp8_block(scales=None) -> BlockData:
    x = torch.randn(2, 2, 16, 3, 8, generator=torch.Generator().manual_seed(0))
    scales = torch.tensor([[1.0, 0.5], [2.0, 0.25]]) if scales is None else scales
    return BlockData(4, 1234, to_cache(x, FP8), scales)


def test_an_fp8_block_ships_half_of_bf16s_bytes_plus_its_scales():
    block = fp8_block()
    msg = wire.encode(block)
    bf16 = wire.encode(BlockData(4, 1234, block.tensor.to(torch.bfloat16)))
    assert 2 * len(msg.data) == len(bf16.data) == 2 * 2 * 16 * 3 * 8 * 2
    assert list(msg.scales) == [1.0, 0.5, 2.0, 0.25] and not bf16.scales
    back = wire.decode(msg, SHAPE, FP8)
    assert torch.equal(back.tensor.view(torch.uint8), block.tensor.view(torch.uint8))
    assert torch.equal(back.scales, block.scales)


@pytest.mark.parametrize("scales, message", [
    ([], "needs 4 finite positive scales, got 0"),
    ([1.0, 1.0, 1.0], "needs 4 finite positive scales, got 3"),
    ([1.0, 0.0, 1.0, 1.0], "finite positive"),
    ([1.0, float("nan"), 1.0, 1.0], "finite positive"),
])
def test_an_fp8_block_without_good_scales_is_rejected(scales, message):
    msg = wire.encode(fp8_block())
    del msg.scales[:]
    msg.scales.extend(scales)
    with pytest.raises(wire.KVWireError, match=message):
        wire.decode(msg, SHAPE, FP8)


def test_scales_on_a_block_of_another_dtype_and_an_fp8_block_for_a_bf16_cache_are_rejected():
    msg = wire.encode(BlockData(4, 1234, torch.zeros(SHAPE, dtype=torch.bfloat16)))
    msg.scales.extend([1.0] * 4)
    with pytest.raises(wire.KVWireError, match="scales on a bfloat16 block"):
        wire.decode(msg, SHAPE, torch.bfloat16)
    with pytest.raises(wire.KVWireError, match="dtype 'float8_e4m3fn', expected bfloat16"):
        wire.decode(wire.encode(fp8_block()), SHAPE, torch.bfloat16)


def test_a_reference_to_an_fp8_slot_carries_the_scales():
    pool = torch.zeros(2, 2, 5, 16, 3, 8, dtype=FP8)
    scales = torch.tensor([[1.0, 0.5], [2.0, 0.25]])
    msg = wire.encode_ref(BlockRef(1, None, 7, pool_block=3), 2, 3, 8, FP8, scales)
    block = wire.decode_ref(msg, pool, SHAPE, FP8)
    assert not msg.data and torch.equal(block.scales, scales) and block.tensor.shape == (2, 2, 7, 3, 8)


def test_a_block_with_other_scales_is_requantized_to_ours():
    """The receiver's scales are 1; a block sent with scales s holds x / s, and lands as x."""
    llm = make_llm("tiny-llama", num_kv_blocks=8, max_model_len=128, kv_cache_dtype="fp8")
    runner, cfg = llm.engine.runner, llm.engine.model_config
    shape = (cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim)
    x = to_cache(torch.randn(shape, generator=torch.Generator().manual_seed(0)), FP8).float()  # exact in fp8
    scales = torch.full((cfg.num_layers, 2), 0.5)
    runner.write_block(2, to_cache(x, FP8, 0.5), scales)
    assert torch.equal(runner.read_block(2, 16).float(), x)
    runner.write_block(3, to_cache(x, FP8), torch.ones(cfg.num_layers, 2))
    assert torch.equal(runner.read_block(3, 16).float(), x)
    with pytest.raises(KVTransferError, match="needs its"):
        runner.write_block(4, to_cache(x, FP8), None)


# ---- disaggregation --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_prefill():
    return make_llm("tiny-llama", max_num_batched_tokens=32, kv_cache_dtype="fp8")


@pytest.fixture(scope="module")
def fp8_decode():
    return make_llm("tiny-llama", kv_cache_dtype="fp8")


@pytest.fixture(scope="module")
def fp8_expected(fp8_decode):
    """The in-process tokens: the same fp8 engine prefilling the prompt itself."""
    out = fp8_decode.generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    fp8_decode.engine.block_manager.reset_prefix_cache()
    return out


def disaggregated(prefill_llm, decode_llm, opener, encoded=None):
    """One request through real prefill and decode servicers on loopback: tokens and record."""
    for llm in (prefill_llm, decode_llm):
        llm.engine.block_manager.reset_prefix_cache()

    async def scenario():
        async with workers(prefill_llm, decode_llm, opener) as w:
            tokens, last = await generate(w.decode, decode_request())
            await until(lambda: w.prefill_engine.core.num_held_requests == 0)
            return tokens, last.disaggregation

    return asyncio.run(scenario())


def assert_decode_holds_prefills_bytes(prefill_llm, decode_llm) -> None:
    """Each full prompt block decode cached is, byte for byte, the fp8 block prefill computed:
    nothing was widened, rescaled or recomputed on the way (the greedy tokens of dummy weights
    alone say little)."""
    hashes = hash_blocks(PROMPT, 16)
    for engine in (prefill_llm.engine, decode_llm.engine):
        assert engine.runner.kv_cache.dtype == FP8
    for h in hashes:
        ours, theirs = (llm.engine.block_manager.cached_block(h) for llm in (decode_llm, prefill_llm))
        assert ours is not None and theirs is not None
        assert torch.equal(decode_llm.engine.runner.read_block(ours, 16).view(torch.uint8),
                           prefill_llm.engine.runner.read_block(theirs, 16).view(torch.uint8))


@pytest.mark.usefixtures("cpu_pool_exported")
def test_fp8_disaggregation_ships_half_of_bf16s_bytes_and_gives_the_in_process_tokens(
        fp8_prefill, fp8_decode, fp8_expected, monkeypatch):
    sent = []
    encode = wire.encode
    monkeypatch.setattr(wire, "encode", lambda block: sent.append(encode(block)) or sent[-1])
    tokens, record = disaggregated(fp8_prefill, fp8_decode, lambda msg: None)  # bytes over gRPC
    assert tokens == fp8_expected and record.kv_transport == "grpc" and record.decode_computed_prompt_tokens == 0
    bf16_prefill = make_llm("tiny-llama", max_num_batched_tokens=32, dtype="bfloat16")
    bf16_decode = make_llm("tiny-llama", dtype="bfloat16")
    bf16_tokens, bf16_record = disaggregated(bf16_prefill, bf16_decode, lambda msg: None)
    assert record.kv_blocks_shipped == bf16_record.kv_blocks_shipped == 10
    cfg = fp8_decode.engine.model_config
    payload = cfg.num_layers * 2 * 150 * cfg.num_kv_heads * cfg.head_dim  # elements of K and V
    # The K/V payload (what kv_bytes_shipped counts) is exactly half; the scales ride beside it,
    # 2 float32 a layer a block, and only on fp8 blocks.
    assert 2 * record.kv_bytes_shipped == bf16_record.kv_bytes_shipped == 2 * payload
    fp8_msgs = [m for m in sent if m.dtype == "float8_e4m3fn"]
    assert len(fp8_msgs) == 10 and sum(len(m.data) for m in fp8_msgs) == payload
    assert all(list(m.scales) == [1.0] * 2 * cfg.num_layers for m in fp8_msgs)
    assert all(not m.scales for m in sent if m.dtype == "bfloat16")
    assert_decode_holds_prefills_bytes(fp8_prefill, fp8_decode)
    for llm in (fp8_prefill, fp8_decode, bf16_prefill, bf16_decode):
        assert_all_free(llm)


@pytest.mark.usefixtures("cpu_pool_exported")
def test_fp8_blocks_by_reference_give_the_in_process_tokens(fp8_prefill, fp8_decode, fp8_expected):
    tokens, record = disaggregated(fp8_prefill, fp8_decode, own_pool(fp8_prefill))
    assert tokens == fp8_expected and record.kv_transport == "cuda_ipc" and record.kv_blocks_shipped == 10
    assert record.decode_computed_prompt_tokens == 0
    assert_decode_holds_prefills_bytes(fp8_prefill, fp8_decode)
    assert_all_free(fp8_prefill)
    assert_all_free(fp8_decode)


def test_a_prefill_peer_with_another_kv_dtype_is_refused_at_the_handshake(fp8_decode):
    fp32_prefill = make_llm("tiny-llama", max_num_batched_tokens=32)

    async def scenario():
        async with workers(fp32_prefill, fp8_decode, lambda msg: None) as w:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await generate(w.decode, decode_request(request_id="r-mismatch"))
            return err.value

    err = asyncio.run(scenario())
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "kv_cache_dtype: ours 'float32', theirs 'float8_e4m3fn'" in err.details()
    assert "--kv-cache-dtype" in err.details()
    assert_all_free(fp32_prefill)
    assert_all_free(fp8_decode)


# ---- accuracy --------------------------------------------------------------------------------------


def perplexity(llm: LLM, text: str) -> float:
    out = llm.generate(text, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
    ids = out.prompt_token_ids
    logprobs = [lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
    return math.exp(-sum(logprobs) / len(logprobs))


@pytest.mark.slow
def test_default_model_perplexity_with_an_fp8_cache_is_within_3_percent_of_fp32(default_llm):
    text = PASSAGE.read_text()
    fp8 = LLM(max_model_len=512, num_kv_blocks=64, kv_cache_dtype="fp8")
    assert fp8.engine.runner.kv_cache.dtype == FP8
    reference, quantized = perplexity(default_llm, text), perplexity(fp8, text)
    assert len(default_llm.tokenizer.encode(text)) > 300 and 10 < reference < 100
    assert quantized != reference  # the cache really is fp8
    assert abs(quantized / reference - 1) <= 0.03, (reference, quantized)
    assert_all_free(fp8)
