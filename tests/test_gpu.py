"""GPU-only checks (marked `gpu`; skipped without CUDA; run on the device, never in CI):
the engine with Triton kernels and CUDA graphs gives the same tokens however it batches,
chunks or preempts, with or without programmatic dependent launch, and the same tokens as
HF transformers on the same weights."""

from __future__ import annotations

import os

import pytest
import torch

from services.engine import SamplingParams
from tests.conftest import make_llm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                                  reason="set TRITON_INTERPRET=0 to run GPU tests")]

PROMPTS = [list(range(100 + 7 * i, 100 + 7 * i + n)) for i, n in enumerate([5, 40, 77, 130, 16, 260, 1, 33])]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def tokens(llm) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def expected():
    """float32 on the GPU, eager, one step at a time, a roomy pool, kernels launched in plain
    stream order (no programmatic dependent launch, kernels/pdl.py): the baseline every
    variant, all launched with PDL, must reproduce."""
    import kernels.pdl

    previous, kernels.pdl.ENABLED = kernels.pdl.ENABLED, False
    try:
        return tokens(make_llm("tiny-llama", dtype="float32", num_kv_blocks=4096, enforce_eager=True,
                               async_scheduling=False))
    finally:
        kernels.pdl.ENABLED = previous


@pytest.mark.parametrize("variant", [
    dict(),  # CUDA graphs for decode, async scheduling
    dict(async_scheduling=False),  # CUDA graphs, each step read back before the next
    dict(max_num_batched_tokens=32),  # chunked prefill mixed with graph decodes
    dict(num_kv_blocks=40, max_model_len=320),  # preemption and recompute
    dict(attention_backend="torch", enforce_eager=True),  # the reference backend on the GPU
    dict(max_num_seqs=1),  # batch 1: prefill graphs (padded chunks), the GEMV and fused norm + GEMV in graphs
    dict(max_num_seqs=1, max_num_batched_tokens=48),  # prefill graphs of chunks after cached context
])
def test_same_tokens_with_graphs_chunking_preemption_and_either_backend(expected, variant, monkeypatch):
    import kernels.pdl

    monkeypatch.setattr(kernels.pdl, "ENABLED", True)
    kwargs = dict(dtype="float32", num_kv_blocks=4096) | variant
    llm = make_llm("tiny-llama", **kwargs)
    assert tokens(llm) == expected
    llm.engine.block_manager.assert_all_free()


def test_greedy_tokens_equal_transformers_in_float32(expected):
    from transformers import AutoModelForCausalLM

    from services.engine.loader import dummy_weights
    from services.engine.presets import preset_config

    cfg = preset_config("tiny-llama")
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).cuda().eval()
    hf.load_state_dict(dict(dummy_weights(cfg, 0)), strict=False)
    for prompt, ours in zip(PROMPTS, expected, strict=True):
        out = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == ours


@pytest.mark.parametrize("transport, perturb", [("auto", False), ("grpc", False), ("auto", True)])
def test_prefill_and_decode_on_one_gpu_ship_kv_by_reference(tmp_path, transport, perturb):
    """Two worker processes on one GPU: with --kv-transport auto the KV moves device to device
    (CUDA IPC, services/kv/cuda_ipc.py), with grpc as bytes; the tokens are the in-process
    engine's either way, every block comes back on both sides, and perturbing what decode
    receives changes tokens (decode really reads the peer's pool)."""
    import concurrent.futures

    from services.cli.stack import LocalStack
    from tests.test_services import GREEDY, generate, kv_faults, wait_all_free

    model = ["--load-format", "dummy", "--preset", "tiny-llama", "--max-model-len", "512", "--dtype", "float32",
             "--num-kv-blocks", "512"]
    reference = make_llm("tiny-llama", dtype="float32", num_kv_blocks=512)
    prompts = [list(range(2000 + 50 * i, 2150 + 50 * i)) for i in range(6)]  # 150 tokens: prefilled remotely
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, GREEDY)]
    env = {**os.environ, **kv_faults("PDSERVE_TEST_PERTURB_KV")} if perturb else None
    with LocalStack(model, 1, 1, log_dir=tmp_path, env=env, decode_argv=["--kv-transport", transport]) as stack:
        import grpc

        from pdserve.v1 import router_pb2_grpc

        router = router_pb2_grpc.RouterStub(grpc.insecure_channel(stack.router_address))
        with concurrent.futures.ThreadPoolExecutor(6) as pool:  # overlapping transfers and holds
            results = list(pool.map(lambda p: generate(router, p), prompts))
        wait_all_free(stack)
    records = [r.disaggregation for r in results]
    assert all(d.remote_prefill and d.decode_computed_prompt_tokens == 0 for d in records)
    assert {d.kv_transport for d in records} == {"cuda_ipc" if transport == "auto" else "grpc"}
    got = [r.completions[0].token_ids for r in results]
    if perturb:  # tiny-llama's dummy weights often repeat one token whatever the context: not every prompt moves
        assert any(g != e for g, e in zip(got, expected, strict=True))
    else:
        assert got == expected


def test_batch1_linear_takes_the_triton_gemv_and_matches_cublas():
    """One row on CUDA goes to kernels/gemv.py below the size limit and to cuBLAS above it;
    both agree with a float32 matmul to bf16 rounding, on projection shapes of the presets."""
    from unittest import mock

    import kernels.gemv
    from services.engine.layers.linear import _GEMV_MAX_BYTES, linear

    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k, bias in [(960, 576, False), (576, 1536, True), (3072, 2048, False), (16384, 2048, False)]:
        x = torch.randn(1, k, device="cuda", generator=g).bfloat16()
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
        b = torch.randn(n, device="cuda", generator=g).bfloat16() if bias else None
        with mock.patch.object(kernels.gemv, "gemv", wraps=kernels.gemv.gemv) as spy:
            y = linear(x, w, b)
        assert spy.called == (n * k * 2 <= _GEMV_MAX_BYTES), (n, k)
        want = x.float() @ w.float().t() + (0 if b is None else b.float())
        torch.testing.assert_close(y.float(), want, atol=2e-2, rtol=2e-2)


def test_fused_norm_gemv_compiles_and_matches_the_unfused_chain_in_bf16():
    """kernels/gemv.py's norm_gemv on the presets' input-projection shapes (qkv with and
    without bias, gate_up with SiLU-and-mul), compiled for the card, against RMSNorm ->
    linear -> SiLU-and-mul in float32; the new residual is exact."""
    from kernels.gemv import norm_gemv, norm_gemv_ref

    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k, bias, silu_mul in [(960, 576, True, False), (3072, 576, False, True), (3072, 2048, False, False),
                                 (16384, 2048, False, True)]:
        x, r = (torch.randn(1, k, device="cuda", generator=g).bfloat16() for _ in range(2))
        norm_w = (1 + 0.1 * torch.randn(k, device="cuda", generator=g)).bfloat16()
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
        b = torch.randn(n, device="cuda", generator=g).bfloat16() if bias else None
        y, res = norm_gemv(x, norm_w, 1e-5, w, r, b, silu_mul)
        want, _ = norm_gemv_ref(x.float(), norm_w.float(), 1e-5, w.float(), r.float(),
                                None if b is None else b.float(), silu_mul)
        torch.testing.assert_close(y.float(), want, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(res, x + r, atol=0, rtol=0)


def test_norm_gemv_rope_cache_compiles_and_matches_the_unfused_chain_in_bf16():
    """kernels/gemv.py's norm_gemv_rope_cache on the presets' attention shapes (SmolLM2,
    Llama-1B, Qwen2.5-0.5B with its qkv bias) against RMSNorm -> qkv_proj -> rotary ->
    cache write in float32: the rotated q, and the slot's k and v (nothing else written)."""
    from kernels.gemv import norm_gemv_rope_cache, norm_gemv_rope_cache_ref

    g = torch.Generator(device="cuda").manual_seed(2)
    for heads, kvh, dim, hidden, bias in [(9, 3, 64, 576, False), (32, 8, 64, 2048, False), (14, 2, 64, 896, True)]:
        n = (heads + 2 * kvh) * dim
        x, r = (torch.randn(1, hidden, device="cuda", generator=g).bfloat16() for _ in range(2))
        norm_w = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).bfloat16()
        w = (torch.randn(n, hidden, device="cuda", generator=g) * 0.02).bfloat16()
        b = torch.randn(n, device="cuda", generator=g).bfloat16() if bias else None
        cos_sin = torch.randn(4096, dim, device="cuda", generator=g)
        positions, slots = torch.tensor([1234], device="cuda"), torch.tensor([5 * 16 + 3], device="cuda")
        k_cache = torch.zeros(8, 16, kvh, dim, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        want_k, want_v = k_cache.float(), v_cache.float()
        q, res = norm_gemv_rope_cache(x, norm_w, 1e-5, w, r, b, heads, positions, cos_sin, k_cache, v_cache, slots)
        want_q, _ = norm_gemv_rope_cache_ref(x.float(), norm_w.float(), 1e-5, w.float(), r.float(),
                                             None if b is None else b.float(), heads, positions, cos_sin,
                                             want_k, want_v, slots)
        torch.testing.assert_close(q.float(), want_q, atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(k_cache.float(), want_k, atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(v_cache.float(), want_v, atol=3e-2, rtol=3e-2)
        assert torch.equal(res, x + r)


def test_batch1_norm_linear_fuses_on_cuda_and_matches_the_unfused_path(monkeypatch):
    """layers/linear.py's norm_linear takes kernels/gemv.py's norm_gemv for one row below the
    GEMV size limit and agrees with the unfused RMSNorm -> linear (-> SiLU-and-mul) it
    replaces, to bf16 rounding; the residual it returns is exact."""
    from unittest import mock

    import kernels.gemv
    from services.engine.layers import linear as linear_mod
    from services.engine.layers.norm import RMSNorm

    monkeypatch.setattr(linear_mod, "FUSE_NORM_GEMV", True)
    g = torch.Generator(device="cuda").manual_seed(1)
    for n, k, bias, silu_mul, with_residual in [(960, 576, False, False, False), (3072, 576, False, True, True),
                                                (1152, 896, True, False, True), (16384, 2048, False, True, True)]:
        norm = RMSNorm(k, 1e-5).cuda().bfloat16()
        norm.weight.data = (1 + 0.1 * torch.randn(k, device="cuda", generator=g)).bfloat16()
        x = torch.randn(1, k, device="cuda", generator=g).bfloat16()
        r = torch.randn(1, k, device="cuda", generator=g).bfloat16() if with_residual else None
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
        b = torch.randn(n, device="cuda", generator=g).bfloat16() if bias else None
        with mock.patch.object(kernels.gemv, "norm_gemv", wraps=kernels.gemv.norm_gemv) as spy:
            y, res = linear_mod.norm_linear(x, r, norm, w, b, silu_mul)
        assert spy.called == (n * k * 2 <= linear_mod._GEMV_MAX_BYTES), (n, k)
        with mock.patch.object(linear_mod, "FUSE_NORM_GEMV", False):
            want, want_res = linear_mod.norm_linear(x, r, norm, w, b, silu_mul)
        torch.testing.assert_close(y.float(), want.float(), atol=3e-2, rtol=3e-2)
        assert torch.equal(res, want_res)


def test_kv_pool_is_stored_head_major_on_the_gpu():
    """On a GPU, each block's tokens of one KV head lie side by side in memory: what decode
    attention reads per program (one KV head of a sequence) is one run per page."""
    pool = make_llm("tiny-llama", device="cuda", num_kv_blocks=64).engine.runner.kv_cache
    layers, kv, blocks, block_size, heads, dim = pool.shape
    assert kv == 2 and pool.storage_offset() == 0
    assert pool.stride()[3:] == (dim, block_size * dim, 1)
    assert pool.stride()[:3] == (kv * blocks * block_size * heads * dim, blocks * block_size * heads * dim,
                                 block_size * heads * dim)


def test_prefill_and_decode_on_two_gpus_move_kv_over_nixl(tmp_path):
    """Two worker processes, each seeing only its own GPU (one GPU: both on it, one at a time),
    --kv-transport nixl: NIXL reads prefill's VRAM pool into decode's over UCX's CUDA transports
    (services/kv/nixl.py). The tokens are the in-process engine's and every block comes back on
    both sides. Needs nixl-cu13 on the host (`make device-wheels DEVICE_PACKAGES=nixl-cu13`)."""
    import concurrent.futures

    import grpc

    from pdserve.v1 import router_pb2_grpc
    from services.cli.placement import gpu_per_worker
    from services.cli.stack import LocalStack
    from tests.test_services import GREEDY, generate, wait_all_free

    pytest.importorskip("nixl_cu13")
    model = ["--load-format", "dummy", "--preset", "tiny-llama", "--max-model-len", "512", "--dtype", "float32",
             "--num-kv-blocks", "512"]
    reference = make_llm("tiny-llama", dtype="float32", num_kv_blocks=512)
    prompts = [list(range(2000 + 50 * i, 2150 + 50 * i)) for i in range(6)]
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, GREEDY)]
    placement = gpu_per_worker(["0", "1"], 1, 1) if torch.cuda.device_count() >= 2 else None
    with LocalStack(model, 1, 1, log_dir=tmp_path, placement=placement, sequential_start=placement is None,
                    worker_argv=["--kv-transport", "nixl"]) as stack:
        router = router_pb2_grpc.RouterStub(grpc.insecure_channel(stack.router_address))
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda p: generate(router, p), prompts))
        wait_all_free(stack)
    records = [r.disaggregation for r in results]
    assert all(d.remote_prefill and d.decode_computed_prompt_tokens == 0 for d in records)
    assert {d.kv_transport for d in records} == {"nixl"}
    assert [r.completions[0].token_ids for r in results] == expected
