"""Triton kernels (KV-cache write, RMSNorm, rotary, GEMV and its fused RMSNorm / SwiGLU form, argmax, the sampler's draw) against their plain-torch references, on the
CPU through Triton's interpreter. Shapes are tiny; behaviour is pinned exactly where it can be."""

from __future__ import annotations

import os

# Must precede the first `triton.jit` of the kernels below (conftest.py sets it too).
os.environ.setdefault("TRITON_INTERPRET", "1")

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from kernels.argmax import _argmax_kernel, argmax, argmax_ref  # noqa: E402
from kernels.cache import _reshape_and_cache_kernel, reshape_and_cache, reshape_and_cache_ref  # noqa: E402
from kernels.gemv import _gemv_kernel, gemv, gemv_ref, norm_gemv, norm_gemv_ref  # noqa: E402
from kernels.rmsnorm import _rms_norm_kernel, rms_norm, rms_norm_ref  # noqa: E402
from kernels.sample import _chunk_kernel, _chunk_top_kernel, _walk_kernel, draw, draw_ref, kept_mass, top_values  # noqa: E402
from kernels.rotary import (  # noqa: E402
    _rotary_and_cache_kernel,
    _rotary_kernel,
    rotary,
    rotary_and_cache,
    rotary_and_cache_ref,
    rotary_ref,
)

_KERNELS = (_reshape_and_cache_kernel, _rms_norm_kernel, _rotary_kernel, _rotary_and_cache_kernel, _gemv_kernel,
            _argmax_kernel, _chunk_kernel, _walk_kernel, _chunk_top_kernel)
if not all(isinstance(k, InterpretedFunction) for k in _KERNELS):
    pytest.skip(
        "the kernels were first imported without TRITON_INTERPRET=1, so they are compiled Triton "
        "kernels this CPU-tensor suite cannot launch; run this file with TRITON_INTERPRET=1",
        allow_module_level=True,
    )

FP32 = dict(atol=1e-5, rtol=1e-5)
FP16 = dict(atol=1e-3, rtol=1e-3)
TOL = {torch.float32: FP32, torch.float16: FP16}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- KV-cache write


def _caches(num_blocks: int, block_size: int, kvh: int, d: int, dtype: torch.dtype, g: torch.Generator):
    shape = (num_blocks, block_size, kvh, d)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("T", [1, 5, 17])
@pytest.mark.parametrize(
    "dtype,cache_dtype",
    [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.float16)],
)
def test_reshape_and_cache_writes_each_token_to_its_slot(
    T: int, dtype: torch.dtype, cache_dtype: torch.dtype
) -> None:
    g = _gen(T)
    key, value = torch.randn(2, T, 3, 32, generator=g).to(dtype).unbind(0)
    k_cache, v_cache = _caches(6, 4, 3, 32, cache_dtype, g)
    slots = torch.randperm(24, generator=g)[:T]
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reshape_and_cache_ref(key, value, k_ref, v_ref, slots)
    reshape_and_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    # Independently: slot s is block s // 4, offset s % 4; everything else is unchanged.
    flat = k_ref.view(-1, 3, 32)
    assert torch.equal(flat[slots], key.to(cache_dtype))
    assert torch.equal(v_ref.view(-1, 3, 32)[slots], value.to(cache_dtype))


def test_negative_slots_are_skipped_and_leave_the_whole_cache_untouched() -> None:
    g = _gen(1)
    key, value = torch.randn(2, 6, 3, 16, generator=g).unbind(0)
    k_cache, v_cache = _caches(3, 4, 3, 16, torch.float32, g)
    slots = torch.tensor([5, -1, 0, -1, 11, -1])
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            expected_k[s // 4, s % 4], expected_v[s // 4, s % 4] = key[t], value[t]
    for fn in (reshape_and_cache_ref, reshape_and_cache):
        kc, vc = k_cache.clone(), v_cache.clone()
        fn(key, value, kc, vc, slots)
        assert torch.equal(kc, expected_k) and torch.equal(vc, expected_v), fn.__name__


def test_all_padding_batch_writes_nothing() -> None:
    g = _gen(2)
    key, value = torch.randn(2, 4, 3, 16, generator=g).unbind(0)
    k_cache, v_cache = _caches(2, 4, 3, 16, torch.float16, g)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    for fn in (reshape_and_cache_ref, reshape_and_cache):
        fn(key, value, k_cache, v_cache, torch.full((4,), -1, dtype=torch.int64))
        assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v), fn.__name__


def test_reshape_and_cache_reads_strided_key_and_value_views() -> None:
    g = _gen(3)
    kv = torch.randn(5, 2, 3, 16, generator=g)  # key and value interleaved, as sliced from a qkv
    key, value = kv[:, 0], kv[:, 1]
    assert not key.is_contiguous()
    k_cache, v_cache = _caches(4, 4, 3, 16, torch.float32, g)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([15, 2, 7, 8, 0])
    reshape_and_cache_ref(key, value, k_ref, v_ref, slots)
    reshape_and_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_reshape_and_cache_and_rotary_and_cache_write_into_a_head_major_pool() -> None:
    """The engine's pool: indexed [blocks, block_size, KVH, D], each block's tokens of one KV
    head stored contiguously (a permuted view). Both writers put token t's head h at
    [slot // bs, slot % bs, h] of that view, i.e. at storage [slot // bs, h, slot % bs]."""
    g = _gen(4)
    T, KVH, D, bs = 5, 3, 16, 4
    key, value = torch.randn(2, T, KVH, D, generator=g).unbind(0)
    stored = torch.zeros(2, 6, KVH, bs, D)
    k_cache, v_cache = stored[0].transpose(1, 2), stored[1].transpose(1, 2)
    slots = torch.tensor([15, 2, 7, 8, 0])
    reshape_and_cache(key, value, k_cache, v_cache, slots)
    for t, slot in enumerate(slots.tolist()):
        assert torch.equal(stored[0, slot // bs, :, slot % bs], key[t])
        assert torch.equal(stored[1, slot // bs, :, slot % bs], value[t])
    assert torch.count_nonzero(stored.sum(-1)) == 2 * T * KVH, "wrote outside the five slots"
    q = torch.randn(T, 2 * KVH, D, generator=g)
    positions = torch.tensor([0, 3, 1, 9, 4])
    kc_ref, vc_ref = (torch.zeros(6, bs, KVH, D) for _ in range(2))
    rotary_and_cache(q, key, value, positions, _cos_sin_cache(16, D), k_cache, v_cache, slots)
    rotary_and_cache_ref(q, key, value, positions, _cos_sin_cache(16, D), kc_ref, vc_ref, slots)
    torch.testing.assert_close(k_cache, kc_ref, **FP32)
    torch.testing.assert_close(v_cache, vc_ref, atol=0, rtol=0)


@pytest.mark.parametrize(
    "case",
    ["key_2d", "value_shape", "cache_3d", "cache_heads", "slots_int32", "slots_length", "key_last_dim_strided"],
)
def test_reshape_and_cache_launcher_rejects_bad_inputs(case: str) -> None:
    key, value = torch.zeros(2, 3, 8), torch.zeros(2, 3, 8)
    k_cache, v_cache = torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 3, 8)
    slots = torch.tensor([0, 1])
    if case == "key_2d":
        key = key[:, 0]
    elif case == "value_shape":
        value = torch.zeros(2, 3, 4)
    elif case == "cache_3d":
        k_cache = v_cache = torch.zeros(8, 3, 8)
    elif case == "cache_heads":
        k_cache = v_cache = torch.zeros(2, 4, 2, 8)
    elif case == "slots_int32":
        slots = slots.int()
    elif case == "slots_length":
        slots = torch.tensor([0, 1, 2])
    else:
        key = torch.zeros(2, 3, 16)[..., ::2]
    with pytest.raises(AssertionError):
        reshape_and_cache(key, value, k_cache, v_cache, slots)


# ----------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("hidden", [576, 61])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(
    T: int, hidden: int, dtype: torch.dtype, with_residual: bool
) -> None:
    g = _gen(T * hidden)
    x = (torch.randn(T, hidden, generator=g) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    residual = torch.randn(T, hidden, generator=g).to(dtype) if with_residual else None
    x_before = x.clone()
    got, want = rms_norm(x, weight, 1e-6, residual), rms_norm_ref(x, weight, 1e-6, residual)
    assert torch.equal(x, x_before)
    if not with_residual:
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype == dtype
        torch.testing.assert_close(got, want, **TOL[dtype])
        return
    (out, res_out), (out_ref, res_ref) = got, want
    torch.testing.assert_close(out, out_ref, **TOL[dtype])
    assert res_out.dtype == dtype and torch.equal(res_out, x + residual) and torch.equal(res_ref, x + residual)


def test_rms_norm_normalises_the_sum_rounded_to_the_input_dtype() -> None:
    # In fp16 the norm must see x + residual rounded to fp16, not the exact fp32 sum: the fused
    # call then equals normalising the (fp16) sum, bit for bit.
    g = _gen(11)
    x, residual = (torch.randn(2, 3, 576, generator=g) * 3).half().unbind(0)
    weight = torch.randn(576, generator=g).half()
    out, res = rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(out, rms_norm(res, weight, 1e-6))


def test_rms_norm_largest_hidden_and_strided_rows() -> None:
    g = _gen(4)
    x = torch.randn(2, 2 * 8192, generator=g)[:, :8192]  # row stride 16384
    residual = torch.randn(2, 8192, generator=g)
    weight = torch.randn(8192, generator=g)
    out, res = rms_norm(x, weight, 1e-5, residual)
    out_ref, res_ref = rms_norm_ref(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, out_ref, **FP32)
    assert torch.equal(res, res_ref)


def test_rms_norm_fp32_weight_on_fp16_input_promotes_like_torch() -> None:
    g = _gen(5)
    x, weight = torch.randn(3, 64, generator=g).half(), torch.randn(64, generator=g)
    out, ref = rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, **FP16)


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_ref_is_bit_identical_to_engine_layer_in_fp32(with_residual: bool) -> None:
    from services.engine.layers.norm import RMSNorm

    g = _gen(6)
    layer = RMSNorm(576, eps=1e-5)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(576, generator=g))
        x = torch.randn(7, 576, generator=g)
        residual = torch.randn(7, 576, generator=g) if with_residual else None
        got, want = rms_norm_ref(x, layer.weight, 1e-5, residual), layer(x, residual)
    if not with_residual:
        assert torch.equal(got, want)
    else:
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    "case", ["x_3d", "weight_shape", "residual_shape", "residual_dtype", "x_int", "too_wide"]
)
def test_rms_norm_launcher_rejects_bad_inputs(case: str) -> None:
    x, weight, residual = torch.zeros(2, 8), torch.ones(8), None
    if case == "x_3d":
        x = torch.zeros(2, 1, 8)
    elif case == "weight_shape":
        weight = torch.ones(9)
    elif case == "residual_shape":
        residual = torch.zeros(3, 8)
    elif case == "residual_dtype":
        residual = torch.zeros(2, 8, dtype=torch.float16)
    elif case == "x_int":
        x = torch.zeros(2, 8, dtype=torch.int32)
    else:
        x, weight = torch.zeros(1, 8193), torch.ones(8193)
    with pytest.raises(AssertionError):
        rms_norm(x, weight, 1e-6, residual)


# ----------------------------------------------------------------------------- rotary


def _inv_freq(d: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float) / d))


def _cos_sin_cache(max_pos: int, d: int) -> torch.Tensor:
    freqs = torch.arange(max_pos, dtype=torch.float)[:, None] * _inv_freq(d)[None, :]  # (P, D/2)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # (P, D)


@pytest.mark.parametrize("T", [1, 4, 13])
@pytest.mark.parametrize("heads", [(9, 3), (4, 4)])
@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_matches_reference(
    T: int, heads: tuple[int, int], D: int, dtype: torch.dtype
) -> None:
    g = _gen(T * D)
    H, KVH = heads
    q, k = torch.randn(T, H, D, generator=g).to(dtype), torch.randn(T, KVH, D, generator=g).to(dtype)
    positions = torch.randint(0, 100, (T,), generator=g)
    cache = _cos_sin_cache(100, D)
    q_before, k_before = q.clone(), k.clone()
    (qo, ko), (qr, kr) = rotary(q, k, positions, cache), rotary_ref(q, k, positions, cache)
    assert torch.equal(q, q_before) and torch.equal(k, k_before), "inputs must not be modified"
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == ko.dtype == dtype
    torch.testing.assert_close(qo, qr, **TOL[dtype])
    torch.testing.assert_close(ko, kr, **TOL[dtype])


def test_rotary_at_position_zero_is_identity() -> None:
    g = _gen(7)
    q, k = torch.randn(3, 9, 32, generator=g), torch.randn(3, 3, 32, generator=g)
    zeros = torch.zeros(3, dtype=torch.int64)
    for fn in (rotary_ref, rotary):
        qo, ko = fn(q, k, zeros, _cos_sin_cache(8, 32))
        assert torch.equal(qo, q) and torch.equal(ko, k), fn.__name__


def test_rotary_equals_complex_multiplication_pairing_i_with_i_plus_half() -> None:
    g = _gen(8)
    T, D = 6, 64
    q, k = torch.randn(T, 9, D, generator=g), torch.randn(T, 3, D, generator=g)
    positions = torch.tensor([0, 1, 2, 17, 255, 4000])
    angles = positions[:, None].float() * _inv_freq(D)[None, :]  # (T, D/2)
    rot = torch.polar(torch.ones_like(angles), angles)[:, None, :]  # (T, 1, D/2)

    def expected(x: torch.Tensor) -> torch.Tensor:
        z = torch.complex(x[..., : D // 2], x[..., D // 2 :]) * rot
        return torch.cat((z.real, z.imag), dim=-1)

    cache = _cos_sin_cache(4096, D)
    for fn in (rotary_ref, rotary):
        qo, ko = fn(q, k, positions, cache)
        torch.testing.assert_close(qo, expected(q), **FP32)
        torch.testing.assert_close(ko, expected(k), **FP32)


def test_rotary_matches_engine_layer_with_its_cos_sin_table() -> None:
    from services.engine.layers.rotary import RotaryEmbedding

    g = _gen(9)
    D = 64
    emb = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), D, max_positions=64)
    q, k = torch.randn(5, 9, D, generator=g), torch.randn(5, 3, D, generator=g)
    positions = torch.tensor([3, 0, 63, 9, 9])
    want = emb.prepare(positions, torch.float32)(q, k)  # the CPU path of the engine's layer
    got = rotary(q, k, positions, emb.cos_sin_half)
    torch.testing.assert_close(got[0], want[0], **FP32)
    torch.testing.assert_close(got[1], want[1], **FP32)


def test_rotary_reads_strided_views_of_a_fused_qkv() -> None:
    g = _gen(10)
    qkv = torch.randn(4, 9 + 3 + 3, 32, generator=g)
    q, k = qkv[:, :9], qkv[:, 9:12]
    positions, cache = torch.tensor([1, 5, 2, 7]), _cos_sin_cache(8, 32)
    (qo, ko), (qr, kr) = rotary(q, k, positions, cache), rotary_ref(q, k, positions, cache)
    torch.testing.assert_close(qo, qr, **FP32)
    torch.testing.assert_close(ko, kr, **FP32)


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                               (torch.float32, torch.float16)])
@pytest.mark.parametrize("heads", [(9, 3), (4, 4)])
def test_rotary_and_cache_rotates_q_and_writes_rotated_k_and_v_to_their_slots(
    dtype: torch.dtype, cache_dtype: torch.dtype, heads: tuple[int, int]
) -> None:
    """The fused kernel against rotary + reshape_and_cache: the returned q, every cache slot
    (written or not), and padding tokens (slot -1) leave the cache untouched. q/k/v are
    strided views of one fused qkv, as the model passes them."""
    g = _gen(11)
    H, KVH = heads
    T, D, bs = 6, 32, 4
    qkv = torch.randn(T, H + 2 * KVH, D, generator=g).to(dtype)
    q, k, v = qkv[:, :H], qkv[:, H : H + KVH], qkv[:, H + KVH :]
    positions = torch.tensor([0, 5, 2, 31, 7, 7])
    slots = torch.tensor([3, -1, 9, 0, -1, 14])
    cache = _cos_sin_cache(32, D)
    kc, vc = _caches(4, bs, KVH, D, cache_dtype, g)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    qkv_before = qkv.clone()
    q_out = rotary_and_cache(q, k, v, positions, cache, kc, vc, slots)
    q_ref = rotary_and_cache_ref(q, k, v, positions, cache, kc_ref, vc_ref, slots)
    assert torch.equal(qkv, qkv_before), "inputs must not be modified"
    assert q_out.shape == q.shape and q_out.dtype == dtype and q_out.is_contiguous()
    torch.testing.assert_close(q_out, q_ref, **TOL[dtype])
    torch.testing.assert_close(kc, kc_ref, **TOL[cache_dtype])
    torch.testing.assert_close(vc, vc_ref, atol=0, rtol=0)  # values are copied, not computed
    # And the reference itself: slot 9 holds token 2's rotated key, untouched slots their old values.
    _, k_rot = rotary_ref(q, k, positions, cache)
    torch.testing.assert_close(kc_ref[2, 1], k_rot[2].to(cache_dtype), **TOL[cache_dtype])


def test_rotary_and_cache_launcher_rejects_bad_inputs() -> None:
    q, k, v = torch.zeros(2, 4, 16), torch.zeros(2, 2, 16), torch.zeros(2, 2, 16)
    positions, cache = torch.zeros(2, dtype=torch.int64), _cos_sin_cache(4, 16)
    kc, vc = torch.zeros(3, 4, 2, 16), torch.zeros(3, 4, 2, 16)
    slots = torch.zeros(2, dtype=torch.int64)
    rotary_and_cache(q, k, v, positions, cache, kc, vc, slots)  # well-formed: runs
    with pytest.raises(AssertionError, match="slot_mapping"):
        rotary_and_cache(q, k, v, positions, cache, kc, vc, slots.int())
    with pytest.raises(AssertionError, match="KVH/D"):
        rotary_and_cache(q, k, v, positions, cache, torch.zeros(3, 4, 1, 16), torch.zeros(3, 4, 1, 16), slots)
    with pytest.raises(AssertionError, match="positions"):
        rotary_and_cache(q, k, v, positions.int(), cache, kc, vc, slots)


@pytest.mark.parametrize(
    "case",
    ["q_2d", "k_head_dim", "not_pow2", "positions_int32", "positions_len", "cache_dim", "cache_fp16", "mixed_dtype"],
)
def test_rotary_launcher_rejects_bad_inputs(case: str) -> None:
    q, k = torch.zeros(2, 4, 16), torch.zeros(2, 2, 16)
    positions, cache = torch.zeros(2, dtype=torch.int64), _cos_sin_cache(4, 16)
    if case == "q_2d":
        q = q[:, 0]
    elif case == "k_head_dim":
        k = torch.zeros(2, 2, 8)
    elif case == "not_pow2":
        q, k, cache = torch.zeros(2, 4, 24), torch.zeros(2, 2, 24), torch.zeros(4, 24)
    elif case == "positions_int32":
        positions = positions.int()
    elif case == "positions_len":
        positions = torch.zeros(3, dtype=torch.int64)
    elif case == "cache_dim":
        cache = _cos_sin_cache(4, 32)
    elif case == "cache_fp16":
        cache = cache.half()
    else:
        k = k.half()
    with pytest.raises(AssertionError):
        rotary(q, k, positions, cache)


# ---- silu_and_mul ------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("inter", [64, 1543])  # 1543: not a power of two, two column blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul_matches_reference(T: int, inter: int, dtype: torch.dtype) -> None:
    g = _gen(T * inter)
    x = (torch.randn(T, 2 * inter, generator=g) * 4).to(dtype)
    got, want = silu_and_mul(x), silu_and_mul_ref(x)
    assert got.shape == (T, inter) and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])
    # Gate and up are not interchangeable: swapping the halves gives another result.
    assert not torch.allclose(silu_and_mul(torch.cat(x.chunk(2, -1)[::-1], -1)), want, **TOL[dtype])


def test_silu_and_mul_reads_strided_rows() -> None:
    g = _gen(3)
    wide = torch.randn(4, 300, generator=g)
    x = wide[:, :256]  # rows 300 apart
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **TOL[torch.float32])


def test_silu_and_mul_launcher_rejects_bad_inputs() -> None:
    with pytest.raises(AssertionError):
        silu_and_mul(torch.randn(4, 7))  # odd width
    with pytest.raises(AssertionError):
        silu_and_mul(torch.randn(4, 8).t())  # columns not contiguous


# ----------------------------------------------------------------------------- batch-1 GEMV


@pytest.mark.parametrize("N, K", [(1, 1), (13, 600), (96, 64), (70, 1030)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_linear_with_ragged_tiles(N: int, K: int, dtype: torch.dtype, with_bias: bool) -> None:
    """N and K off the tile sizes (masked rows and columns), bias or none, against F.linear
    in float32 (the kernel accumulates in float32)."""
    g = _gen(N * K)
    x, w = torch.randn(1, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if with_bias else None
    want = gemv_ref(x.float(), w.float(), None if b is None else b.float())
    got = gemv(x, w, b, block_n=4, block_k=256)
    assert got.shape == (1, N) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **({"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else
                                                     {"atol": 2e-2, "rtol": 2e-3}))


@pytest.mark.parametrize("silu_mul", [False, True])
def test_gemv_pdl_path_reads_whole_rows_before_its_wait(monkeypatch, silu_mul: bool) -> None:
    """With PDL the default K tile is the whole (padded) row, read before the wait, unless a
    program's rows would not fit in registers (K = 3000 with SiLU-and-mul: 2 x 4 x 4096 >
    8192): both cases against the reference (the wait is a no-op in the interpreter)."""
    import kernels.gemv as gemv_mod

    monkeypatch.setattr(gemv_mod, "use_pdl", lambda device: True)
    assert gemv_mod._block_k(576, 4, True) == 1024 and gemv_mod._block_k(3000, 8, True) == 512
    assert gemv_mod._block_k(576, 4, False) == 512
    g = _gen(99)
    for N, K in [(10, 576), (6, 3000)]:
        x, w = torch.randn(1, K, generator=g), torch.randn(N, K, generator=g) / K**0.5
        torch.testing.assert_close(gemv(x, w), gemv_ref(x, w), atol=1e-4, rtol=1e-4)
        norm_w, r = 1 + 0.3 * torch.randn(K, generator=g), torch.randn(1, K, generator=g)
        want, _ = norm_gemv_ref(x, norm_w, 1e-5, w, r, None, silu_mul)
        got, _ = norm_gemv(x, norm_w, 1e-5, w, r, None, silu_mul)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_gemv_reads_a_strided_weight_view() -> None:
    g = _gen(12)
    full = torch.randn(40, 300, generator=g)
    w = full[:, :200]  # rows 300 apart: a column slice of a bigger matrix
    x = torch.randn(1, 200, generator=g)
    torch.testing.assert_close(gemv(x, w), gemv_ref(x, w), **FP32)


@pytest.mark.parametrize("N, K", [(6, 1), (14, 600), (96, 64), (70, 1030)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual, with_bias, silu_mul",
                         [(False, False, False), (True, False, False), (True, True, False), (True, False, True),
                          (False, False, True)])
def test_norm_gemv_matches_rmsnorm_then_linear(N, K, dtype, with_residual, with_bias, silu_mul) -> None:
    """The fused RMSNorm (+ residual) -> GEMV (-> SiLU-and-mul) against the unfused reference:
    K over several tiles (the mean of squares spans them) and off the tile size, outputs off
    BLOCK_N; the new residual is exact (the same rounded add)."""
    g = _gen(N * K + 7)
    x, w = torch.randn(1, K, generator=g).to(dtype), (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    norm_w = (1 + 0.3 * torch.randn(K, generator=g)).to(dtype)
    r = torch.randn(1, K, generator=g).to(dtype) if with_residual else None
    b = torch.randn(N, generator=g).to(dtype) if with_bias else None
    want, _ = norm_gemv_ref(x.float(), norm_w.float(), 1e-5, w.float(), None if r is None else r.float(),
                            None if b is None else b.float(), silu_mul)
    got, got_res = norm_gemv(x, norm_w, 1e-5, w, r, b, silu_mul, block_n=4, block_k=256)
    assert got.shape == (1, N // 2 if silu_mul else N) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **({"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else
                                                     {"atol": 5e-3, "rtol": 5e-3}))
    if r is None:
        assert got_res is x  # the input is the residual
    else:
        torch.testing.assert_close(got_res, (x + r), atol=0, rtol=0)
        assert got_res.data_ptr() not in (x.data_ptr(), r.data_ptr())  # inputs not modified


def test_norm_gemv_launcher_rejects_bad_inputs() -> None:
    w, x, norm_w = torch.zeros(8, 16), torch.zeros(1, 16), torch.ones(16)
    with pytest.raises(AssertionError, match="norm_weight"):
        norm_gemv(x, torch.ones(15), 1e-5, w)
    with pytest.raises(AssertionError, match="residual"):
        norm_gemv(x, norm_w, 1e-5, w, residual=torch.zeros(1, 16).half())
    with pytest.raises(AssertionError, match="silu_mul"):
        norm_gemv(x, norm_w, 1e-5, torch.zeros(7, 16), silu_mul=True)
    with pytest.raises(AssertionError, match="silu_mul"):
        norm_gemv(x, norm_w, 1e-5, w, bias=torch.zeros(8), silu_mul=True)


def test_gemv_launcher_rejects_bad_inputs() -> None:
    w = torch.zeros(8, 16)
    with pytest.raises(AssertionError, match=r"\[1, K\]"):
        gemv(torch.zeros(2, 16), w)
    with pytest.raises(AssertionError, match="features"):
        gemv(torch.zeros(1, 15), w)
    with pytest.raises(AssertionError, match="dtypes"):
        gemv(torch.zeros(1, 16).half(), w)
    with pytest.raises(AssertionError, match="bias"):
        gemv(torch.zeros(1, 16), w, torch.zeros(7))


# ---- argmax -----------------------------------------------------------------------------------


@pytest.mark.parametrize("B, V", [(1, 7), (3, 1000), (2, 8192), (1, 20000)])  # one tile, ragged tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_argmax_matches_torch(B: int, V: int, dtype: torch.dtype) -> None:
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(V)).to(dtype)
    assert torch.equal(argmax(logits), argmax_ref(logits))


def test_argmax_takes_the_first_of_tied_maxima_across_lanes_and_tiles() -> None:
    logits = torch.zeros(3, 20000)
    logits[0, [9000, 700, 19999]] = 5.0  # lanes 808, 700, ... of different tiles: index 700 first
    logits[1, [8192 + 3, 3]] = 2.0  # the same lane in tiles 1 and 0
    logits[2] = float("-inf")  # nothing finite: index 0, as torch
    assert argmax(logits).tolist() == argmax_ref(logits).tolist() == [700, 3, 0]


def test_argmax_counts_nan_as_the_largest_and_writes_into_a_view() -> None:
    logits = torch.randn(2, 300)
    logits[0, 17] = float("nan")
    logits[1, 5] = 1e30
    out = torch.full((5,), -1, dtype=torch.long)
    argmax(logits, out=out[1:3])
    assert out.tolist() == [-1, 17, 5, -1, -1]
    assert argmax_ref(logits).tolist() == [17, 5]


def test_argmax_launcher_rejects_bad_inputs() -> None:
    with pytest.raises(AssertionError, match="contiguous rows"):
        argmax(torch.randn(4, 6).t())
    with pytest.raises(AssertionError, match="int64"):
        argmax(torch.randn(2, 6), out=torch.empty(2, dtype=torch.int32))


# ----------------------------------------------------------------------------- sampler's draw


def _draw_case(R: int, V: int, dtype: torch.dtype, seed: int):
    g = _gen(seed)
    logits = (torch.randn(R, V, generator=g) * 3).to(dtype)
    temperature = torch.rand(R, generator=g) * 1.5 + 0.2
    u = torch.rand(R, generator=g)
    x = logits.float() / temperature[:, None]
    threshold = torch.where(torch.arange(R) % 2 == 0, torch.topk(x, 7, dim=-1).values[:, -1], float("-inf"))
    min_p = torch.where(torch.arange(R) % 3 == 0, 0.05, 0.0)
    return logits, temperature, threshold, min_p, u


@pytest.mark.parametrize("V", [50, 300, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_draw_matches_the_samplers_torch_path(V: int, dtype: torch.dtype) -> None:
    logits, temperature, threshold, min_p, u = _draw_case(16, V, dtype, V)
    for th, mp in ((None, None), (threshold, None), (None, min_p), (threshold, min_p)):
        got, want = draw(logits, temperature, th, mp, u), draw_ref(logits, temperature, th, mp, u)
        # The walk and the reference sum in other orders: a token may differ only where the
        # target lies within rounding of a boundary between two kept tokens.
        assert (got == want).float().mean() >= 0.9, (th is None, mp is None)
        x = logits.float() / temperature[:, None]
        kept = x >= (th if th is not None else torch.full((16,), float("-inf")))[:, None]
        if mp is not None:
            kept &= torch.exp(x - x.max(dim=-1, keepdim=True).values) >= mp[:, None]
        assert kept.gather(1, got[:, None]).all()  # a dropped token is never drawn


def test_draw_walks_to_the_token_the_uniform_points_at() -> None:
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0] + [0.0] * 5000] * 4)).to(torch.float32)
    # weights 1, 2, 3, 4 (total 10): cumulative 0.1, 0.3, 0.6, 1.0
    u = torch.tensor([0.05, 0.25, 0.55, 0.99])
    one = torch.ones(4)
    assert draw(logits, one, None, None, u).tolist() == [0, 1, 2, 3]
    # top-2 by threshold: weights 3, 4 (total 7): 0.55 * 7 = 3.85 -> token 3
    threshold = torch.full((4,), float(torch.log(torch.tensor(3.0))))
    assert draw(logits, one, threshold, None, u).tolist() == [2, 2, 3, 3]
    # min_p 0.6: w = x / 4 >= 0.6 keeps only 3 and 4
    assert draw(logits, one, None, torch.full((4,), 0.6), u).tolist() == [2, 2, 3, 3]


def test_draw_launcher_rejects_bad_inputs() -> None:
    one = torch.ones(2)
    with pytest.raises(AssertionError, match="contiguous rows"):
        draw(torch.randn(6, 2).t(), one, None, None, one)
    with pytest.raises(AssertionError, match="u must be float32"):
        draw(torch.randn(2, 6), one, None, None, one.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_device_threshold_and_kept_mass_match_the_torch_path(dtype: torch.dtype, monkeypatch) -> None:
    """The GPU sampler's thresholds (top_k, top_p with and without top_k, min_p beside them),
    from candidates in the logits' dtype and a chunked whole-row mass, are ops.thresholds'."""
    from services.engine import sampler
    from services.engine import sampling_ops as ops
    from services.engine.sampler import candidates_width, device_threshold

    # top_values has its own test below; the interpreter sorts too slowly for rows this long
    monkeypatch.setattr(sampler, "top_values", lambda logits, k: torch.topk(logits.float(), k, dim=-1).values)

    R, V = 12, 5000
    g = _gen(7)
    logits = (torch.randn(R, V, generator=g) * 2).to(dtype)
    logits[0, :40] = logits[0, 0]  # ties at the k-th value that reach past the candidates
    temperature = torch.rand(R, generator=g) + 0.3
    x = logits.float() / temperature[:, None]
    k = torch.tensor([0, 5, 50, 0, 3, 20, 0, 9, 1, 0, 50, 7])
    p = torch.tensor([0.9, 1.0, 0.8, 0.5, 0.95, 0.7, 1.0, 0.6, 0.9, 0.99, 1.0, 0.85])
    min_p = torch.where(torch.arange(R) % 4 == 1, 0.1, 0.0)
    for f in (ops.Filters(k, None, None, 50, False), ops.Filters(k.clamp(min=1), p, None, 50, False),
              ops.Filters(k.clamp(min=1), p, min_p, 50, False), ops.Filters(k, p, None, 50, True)):
        want = ops.thresholds(x, f, candidates_width(f, V)).threshold
        assert torch.equal(device_threshold(logits, temperature, f), want)
    threshold = torch.topk(x, 9, dim=-1).values[:, -1]
    top = x.max(dim=-1).values
    assert torch.allclose(kept_mass(logits, temperature, threshold, min_p, top),
                          ops.kept_weights(x, threshold, min_p, top[:, None]).sum(dim=-1), rtol=1e-5)


def test_a_graphs_draw_over_every_row_is_the_eager_draw_of_the_rows_that_sample(monkeypatch) -> None:
    """A decode graph draws every row of its bucket with the staged values (Sampler.in_graph):
    greedy rows (temperature 1 in their place), rows that filter nothing (k 0, top_p 1, min_p
    0) and max_k fixed at GRAPH_TOP_K. Its thresholds and tokens for the rows that sample are
    those of the eager GPU path over those rows alone, whose filters hold only what they use."""
    from services.engine import SamplingParams, sampler
    from services.engine.sampler import GRAPH_TOP_K, Sampler, device_threshold, draw_with_kernels
    from services.engine.sampling_ops import Filters
    from services.engine.scheduler import SampleSpec

    monkeypatch.setattr(sampler, "top_values", lambda logits, k: torch.topk(logits.float(), k, dim=-1).values)
    V = 3000
    rows = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=1),
            SamplingParams(temperature=1.2, top_k=5), SamplingParams(temperature=0.6, min_p=0.2),
            SamplingParams(temperature=0), SamplingParams(temperature=0.9),
            SamplingParams(temperature=1.0, top_k=GRAPH_TOP_K, top_p=0.5, min_p=0.05, seed=2),
            SamplingParams(temperature=0.7, top_k=20, top_p=0.6)]
    g = _gen(3)
    logits = (torch.randn(len(rows), V, generator=g) * 3).to(torch.float16)
    logits[1, :60] = logits[1].max()  # ties at the k-th value, reaching past the candidates
    batches = ([0, 1, 2, 3, 4, 5, 6, 7], [0, 3, 5], [1, 2], [3, 5], [4, 6, 0])  # min_p alone, k alone, ...
    for at in batches:
        specs = [SampleSpec(rows[r], (0,), 3, [1, 2, 3]) for r in at]
        staged = Sampler((2,), seed=5).in_graph(specs, V, torch.device("cpu"))
        eager = Sampler((2,), seed=5)
        eager.in_graph(specs, V, torch.device("cpu"))  # the same uniforms drawn
        batch = eager._batch
        draw_rows = torch.tensor(batch.draw_rows)
        temperature = torch.from_numpy(staged.temperature)
        temperature = torch.where(temperature > 0, temperature, 1.0)
        u = torch.from_numpy(staged.uniforms)
        filters = (Filters(torch.from_numpy(staged.top_k), torch.from_numpy(staged.top_p),
                           torch.from_numpy(staged.min_p), GRAPH_TOP_K, False) if staged.filtered else None)
        sub = logits[at][draw_rows]
        f = batch.filters
        if filters is not None and (f.max_k or f.top_p is not None):
            want = device_threshold(sub, batch.temperature, f)
            assert torch.equal(device_threshold(logits[at], temperature, filters)[draw_rows], want), at
        graph = draw_with_kernels(logits[at], temperature, filters or sampler.NO_FILTERS, u)
        assert torch.equal(graph[draw_rows], draw_with_kernels(sub, batch.temperature, f, u[draw_rows])), at


@pytest.mark.parametrize("k", [5, 20, 130])  # 130: more than a chunk holds, torch.topk
def test_top_values_are_torch_topks(k: int) -> None:
    """Chunks that sort themselves and keep k values each hold the row's k largest, ties
    repeated: across chunks (a row whose maxima all sit in one chunk) and inside one."""
    g = _gen(k)
    logits = torch.randn(4, 600, generator=g).to(torch.float16)
    logits[1, 70:120] = 7.0  # 50 tied maxima in the second chunk
    logits[2, ::7] = -float("inf")
    logits[3, 590:] = 9.0  # the last, partial chunk
    assert torch.equal(top_values(logits, k, chunk=64), torch.topk(logits.float(), k, dim=-1).values)

