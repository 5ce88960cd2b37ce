"""Triton attention kernels against their torch references, on the CPU through Triton's
interpreter (fp32 and fp16: the interpreter's bf16 dot is wrong). GPU runs: tests/test_gpu.py."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref  # noqa: E402
from kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a GPU or the Triton interpreter")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}


def paged_kv(lens: list[int], page: int, kvh: int, d: int, dtype, seed=0, head_major=False):
    """A shuffled pool holding each sequence's K/V, and the block tables pointing into it.
    The pool is indexed [blocks, page, kvh, d]; `head_major` stores it as the engine does,
    each block's tokens of one KV head contiguous (a permuted view)."""
    g = torch.Generator().manual_seed(seed)
    blocks_per = [-(-n // page) for n in lens]
    num_blocks = sum(blocks_per) + 3  # spare blocks that nobody should read
    order = torch.randperm(num_blocks, generator=g).tolist()
    shape = (num_blocks, kvh, page, d) if head_major else (num_blocks, page, kvh, d)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    if head_major:
        k_cache, v_cache = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    width = max(blocks_per)
    tables, i = [], 0
    for nb in blocks_per:
        row = order[i : i + nb]
        i += nb
        tables.append(row + [order[-1]] * (width - nb))  # padding: a valid id, masked by lens
    bt = torch.tensor(tables, dtype=torch.int32)
    return k_cache.to(DEVICE), v_cache.to(DEVICE), bt.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4), (8, 2)])
@pytest.mark.parametrize("num_splits, min_split_len", [(1, None), (3, 64), (4, None), (4, 128)])
def test_decode_kernel_matches_reference_on_ragged_gqa_batches(dtype, heads, kv_heads, num_splits, min_split_len):
    """Ragged lengths; with 3 splits of at least one tile, lengths 130 and 64 are merged
    from 3 and 1 splits; with 4 splits of at least 64 tokens, 130 from 3 (of 4 launched)."""
    lens = [1, 17, 64, 130, 5]
    k_cache, v_cache, bt = paged_kv(lens, 16, kv_heads, 64, dtype)
    q = torch.randn(len(lens), heads, 64, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    ref = paged_decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), bt, seq_lens, 0.125)
    out = paged_decode_attention(q, k_cache, v_cache, bt, seq_lens, 0.125, num_splits=num_splits,
                                 min_split_len=min_split_len)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


@pytest.mark.parametrize("num_splits, min_split_len, block_n", [(1, 64, 64), (16, 64, 64), (4, 512, 128),
                                                                 (4, 1024, 128), (4, 512, 64)])
def test_decode_kernel_on_a_head_major_pool_with_each_engine_setting(num_splits, min_split_len, block_n):
    """The engine's pool layout and its launch settings (cuda_graphs.decode_splits): 1,100
    tokens are cut into 3 splits of 512 (64- or 128-token tiles), 2 of 1,024, or 9 of 128
    (at most 16 splits: 1,100 / 16 rounds up to two 64-token tiles); 600 into 2, 1 or 10."""
    lens = [1, 17, 130, 600, 1100]
    k_cache, v_cache, bt = paged_kv(lens, 16, 3, 32, torch.float32, seed=7, head_major=True)
    assert k_cache.stride()[1:] == (32, 16 * 32, 1)
    q = torch.randn(len(lens), 9, 32, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, bt, seq_lens, 0.125)
    out = paged_decode_attention(q, k_cache, v_cache, bt, seq_lens, 0.125, num_splits=num_splits,
                                 min_split_len=min_split_len, block_n=block_n)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("num_splits, min_split_len", [(1, None), (4, 64)])
def test_decode_kernel_pdl_path_reads_the_newest_token_after_its_wait(monkeypatch, num_splits, min_split_len):
    """With PDL the first tile is read before the wait without the newest token, which the
    kernel before writes, and that one row after it (the wait is a no-op here, but a row
    left out or read twice would change the result). Lengths put the newest token in a
    first tile (1, 17, 64) and in a later one (130)."""
    import kernels.paged_attention as pa

    monkeypatch.setattr(pa, "use_pdl", lambda device: True)
    lens = [1, 17, 64, 130, 65]
    k_cache, v_cache, bt = paged_kv(lens, 16, 3, 64, torch.float32, seed=5)
    q = torch.randn(len(lens), 9, 64, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, bt, seq_lens, 0.125)
    out = paged_decode_attention(q, k_cache, v_cache, bt, seq_lens, 0.125, num_splits=num_splits,
                                 min_split_len=min_split_len)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_decode_kernel_with_more_splits_than_pages_and_small_pages():
    lens = [3, 40]
    k_cache, v_cache, bt = paged_kv(lens, 4, 2, 32, torch.float32)
    q = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, bt, seq_lens, 0.2)
    out = paged_decode_attention(q, k_cache, v_cache, bt, seq_lens, 0.2, num_splits=8, block_n=16, min_split_len=16)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])  # 40 tokens: 3 splits used of 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, head_major", [(9, 3, False), (4, 4, False), (9, 3, True)])
def test_prefill_kernel_matches_reference_with_cached_context(dtype, heads, kv_heads, head_major):
    # (context, new tokens): fresh prompt, chunk after a prefix hit, single token, long chunk
    shapes = [(0, 20), (32, 7), (5, 1), (16, 70)]
    lens = [c + n for c, n in shapes]
    k_cache, v_cache, bt = paged_kv(lens, 16, kv_heads, 64, dtype, seed=3, head_major=head_major)
    q_lens = [n for _, n in shapes]
    q = torch.randn(sum(q_lens), heads, 64, generator=torch.Generator().manual_seed(4)).to(dtype).to(DEVICE)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    ref = paged_prefill_attention_ref(q.float(), k_cache.float(), v_cache.float(), bt, qsl, seq_lens, 0.125)
    out = paged_prefill_attention(q, k_cache, v_cache, bt, qsl, seq_lens, 0.125, max_query_len=max(q_lens))
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


def test_split_counters_are_left_zeroed_and_one_buffer_serves_every_launch():
    """The splits merge in the same launch through per-(sequence, KV head) tickets: a shared
    counter buffer comes back all zeros after each call, so the next layer (or graph replay)
    can reuse it, whatever the batch and split count; the output may be a strided slice."""
    counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    for lens, splits, kvh in (([5, 130, 64], 4, 2), ([17, 1], 8, 4), ([200, 3, 40, 90, 1], 2, 2)):
        k_cache, v_cache, bt = paged_kv(lens, 16, kvh, 32, torch.float32, seed=splits)
        q = torch.randn(len(lens), 2 * kvh, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        ref = paged_decode_attention_ref(q, k_cache, v_cache, bt, seq_lens, 0.3)
        big = torch.full((len(lens) + 2, 2 * kvh, 32), 7.0, device=DEVICE)
        for _ in range(2):
            got = paged_decode_attention(q, k_cache, v_cache, bt, seq_lens, 0.3, num_splits=splits,
                                         out=big[1:-1], counters=counters, min_split_len=64)
            torch.testing.assert_close(got, ref, **TOL[torch.float32])
            assert torch.count_nonzero(counters) == 0, "a ticket counter was left set"
        assert (big[0] == 7.0).all() and (big[-1] == 7.0).all(), "wrote outside the out slice"
    with pytest.raises(AssertionError, match="counters"):
        paged_decode_attention(q, k_cache, v_cache, bt, seq_lens, 0.3, num_splits=2, counters=counters[:3])


def test_launchers_check_their_inputs():
    k_cache, v_cache, bt = paged_kv([4], 16, 2, 64, torch.float32)
    q = torch.randn(1, 3, 64, device=DEVICE)  # 3 heads over 2 KV heads
    with pytest.raises(AssertionError, match="heads"):
        paged_decode_attention(q, k_cache, v_cache, bt, torch.tensor([4], dtype=torch.int32, device=DEVICE), 1.0)
    q = torch.randn(1, 2, 64, device=DEVICE)
    with pytest.raises(AssertionError):
        paged_decode_attention(q, k_cache, v_cache, bt.long(), torch.tensor([4], dtype=torch.int32, device=DEVICE), 1.0)


def test_engine_with_the_triton_backend_gives_the_torch_backends_tokens():
    """The backend's plumbing (metadata, mixed decode + chunked-prefill steps, prefix hits),
    run through the interpreter on a tiny model."""
    from services.engine import SamplingParams
    from tests.conftest import make_llm

    prompts = [list(range(500, 540)), list(range(500, 520)) + [7, 8, 9], [42]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    pool = dict(num_kv_blocks=256, dtype="float32", enforce_eager=True)  # two engines share one device
    expected = [o.outputs[0].token_ids for o in make_llm("tiny-llama", attention_backend="torch", **pool)
                .generate(prompts, params)]
    triton_llm = make_llm("tiny-llama", attention_backend="triton", max_num_batched_tokens=24, **pool)
    assert [o.outputs[0].token_ids for o in triton_llm.generate(prompts, params)] == expected
    # Again: the shared 16-token prefix now hits the prefix cache (context + chunk attention).
    assert [o.outputs[0].token_ids for o in triton_llm.generate(prompts, params)] == expected
    triton_llm.engine.block_manager.assert_all_free()


def test_engine_batch1_fused_kernels_and_pdl_paths_give_the_torch_backends_tokens(monkeypatch):
    """One sequence at a time, as on a GPU: the GEMV path of layers/linear.py (its CUDA check
    lifted), so each layer's attention input is kernels/gemv.py's norm_gemv_rope_cache (norm,
    qkv, rotary, cache write in one launch), with every kernel's PDL path (its early reads;
    the wait is a no-op in the interpreter)."""
    from unittest import mock

    import kernels.gemv
    import kernels.paged_attention
    import kernels.rmsnorm
    import kernels.rotary
    from services.engine import SamplingParams
    from services.engine.layers import linear
    from tests.conftest import make_llm

    prompts = [list(range(300, 340)), [42]]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    pool = dict(num_kv_blocks=64, dtype="float32", enforce_eager=True, max_num_seqs=1)
    expected = [o.outputs[0].token_ids for o in make_llm("tiny-llama", attention_backend="torch", **pool)
                .generate(prompts, params)]
    def takes_gemv_on_the_cpu(x, weight):  # not the 49152-row LM head: too slow in the interpreter
        return x.dim() == 2 and x.shape[0] == 1 and x.dtype == weight.dtype and weight.shape[0] <= 4096

    monkeypatch.setattr(linear, "_takes_gemv", takes_gemv_on_the_cpu)
    for module in (kernels.gemv, kernels.paged_attention, kernels.rmsnorm, kernels.rotary):
        monkeypatch.setattr(module, "use_pdl", lambda device: True)
    llm = make_llm("tiny-llama", attention_backend="triton", **pool)
    with mock.patch.object(kernels.gemv, "norm_gemv_rope_cache", wraps=kernels.gemv.norm_gemv_rope_cache) as spy:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == expected
    # every layer of 9 one-token steps: 4 decodes after the 40-token prompt, 5 from the 1-token one
    assert spy.call_count == 9 * llm.engine.model_config.num_layers
    llm.engine.block_manager.assert_all_free()
