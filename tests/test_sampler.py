"""The sampler against the semantics its module docstring defines, on tiny crafted logits.

Probabilities chosen as powers of two (logits ln 4, ln 2, 0, ...) come out of float32 softmax
exactly, so the top_p and min_p boundaries are pinned exactly, not approximately.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from services.engine.outputs import Logprob, SampledToken
from services.engine import sampling_ops as ops
from services.engine.sampler import Sampler
from services.engine.sampling_batch import DrawValues, _filters
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import SampleSpec
from tests.sampling_reference import reference_probs

EOS = 2
GREEDY = SamplingParams(temperature=0.0)
LN2 = math.log(2.0)
# Probabilities exactly (0.5, 0.25, 0.125, 0.0625, 0.0625) in float32.
HALVING = [4 * LN2, 3 * LN2, 2 * LN2, LN2, LN2]
# Probabilities exactly (0.5, 0.25, 0.125, 0.125) in float32.
QUARTERS = [2 * LN2, LN2, 0.0, 0.0]
UNIFORM8 = [0.0] * 8


def make_spec(
    params: SamplingParams = GREEDY,
    *,
    prompt: tuple[int, ...] = (7,),
    output: tuple[int, ...] = (),
    seq: tuple[int, ...] = (0,),
) -> SampleSpec:
    return SampleSpec(
        params=params,
        seq_indices=seq,
        num_prompt_tokens=len(prompt),
        token_ids=[*prompt, *output],
    )


def sample(rows, specs: list[SampleSpec], sampler: Sampler | None = None) -> list[list[SampledToken]]:
    """Runs the sampler on a fresh copy of `rows` (it may write into its input)."""
    logits = torch.tensor(rows, dtype=torch.float32)
    if logits.dim() == 1:
        logits = logits[None]
    return (sampler or Sampler(eos_token_ids=(EOS,), seed=0))(logits, specs)


def token_of(row, spec: SampleSpec, sampler: Sampler | None = None) -> int:
    (group,) = sample(row, [spec], sampler)
    (tok,) = group
    return tok.token_id


def tokens_of(row, spec: SampleSpec, sampler: Sampler | None = None) -> list[int]:
    (group,) = sample(row, [spec], sampler)
    return [t.token_id for t in group]


def softmax_kept(row, keep: list[int]) -> torch.Tensor:
    """Softmax over the kept logits, exact zeros elsewhere."""
    logits = torch.tensor(row, dtype=torch.float32)
    mask = torch.ones_like(logits, dtype=torch.bool)
    mask[keep] = False
    return torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1)


def assert_probs(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    # The kept set must be exact: zeros exactly where expected is zero, nowhere else.
    assert (actual == 0).tolist() == (expected == 0).tolist()
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


# ---- greedy ---------------------------------------------------------------------------------


def test_greedy_picks_argmax():
    row = [0.1, -2.0, 0.3, 5.0, 4.9, -1.0]
    assert token_of(row, make_spec(GREEDY)) == 3


def test_greedy_batch_picks_argmax_per_row():
    rows = [[0.1, 2.0, 0.3, -1.0], [3.0, 2.0, 0.3, -1.0], [0.1, 2.0, 0.3, 9.0]]
    out = sample(rows, [make_spec(GREEDY) for _ in rows])
    assert [g[0].token_id for g in out] == [1, 0, 3]


def test_top_k_one_equals_greedy():
    gen = torch.Generator().manual_seed(1234)
    logits = torch.randn(64, 10, generator=gen) * 3
    rows = logits.tolist()
    top1 = sample(rows, [make_spec(SamplingParams(temperature=1.0, top_k=1)) for _ in rows])
    greedy = sample(rows, [make_spec(GREEDY) for _ in rows])
    assert [g[0].token_id for g in top1] == [g[0].token_id for g in greedy]
    assert [g[0].token_id for g in top1] == logits.argmax(dim=-1).tolist()


# ---- seeded reproducibility -----------------------------------------------------------------


def seeded_uniform(seed: int, seq_index: int, output_pos: int) -> float:
    return float(ops.counter_uniforms(ops.SEEDED_STREAM, np.array([seed]), np.array([seq_index]),
                                      np.array([output_pos]))[0])


def test_seeded_token_is_the_inverse_cdf_draw_of_the_documented_uniform():
    """The first token (in id order) whose running probability exceeds u, u keyed by (seed, seq index, output pos)."""
    params = SamplingParams(temperature=1.0, seed=42)
    cdf = torch.cumsum(torch.softmax(torch.tensor(UNIFORM8), dim=-1), dim=0)
    for seq_index in range(3):
        for output_pos in range(4):
            u = seeded_uniform(42, seq_index, output_pos)
            expected = int((cdf <= u * cdf[-1]).sum())
            spec = make_spec(params, output=(1,) * output_pos, seq=(seq_index,))
            assert token_of(UNIFORM8, spec) == expected


def test_counter_uniforms_are_a_pure_function_of_their_key():
    assert seeded_uniform(5, 1, 3) == seeded_uniform(5, 1, 3)
    assert len({seeded_uniform(5, 1, 3), seeded_uniform(6, 1, 3), seeded_uniform(5, 2, 3), seeded_uniform(5, 1, 4)}) == 4
    u = ops.counter_uniforms(ops.SEEDED_STREAM, np.full(1000, 2**63 - 1), np.arange(1000), np.full(1000, 10**6))
    assert u.dtype == np.float32 and 0.0 <= u.min() and u.max() < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.03  # 1000 uniforms: standard error 0.009


def test_seeded_draw_ignores_other_rows_in_the_batch_and_their_order():
    seeded = make_spec(SamplingParams(temperature=1.0, seed=7), output=(4, 4, 4), seq=(1,))
    alone = token_of(UNIFORM8, seeded)

    gen = torch.Generator().manual_seed(0)
    others = torch.randn(5, 8, generator=gen).tolist()
    other_specs = [
        make_spec(SamplingParams(temperature=1.0)),  # unseeded: consumes the shared generator
        make_spec(SamplingParams(temperature=0.7, seed=8), output=(1,)),
        make_spec(GREEDY),
        make_spec(SamplingParams(temperature=1.0), seq=(0, 1, 2)),  # a fork, expands to 3 rows
        make_spec(SamplingParams(temperature=1.0, seed=7), output=(4, 4)),  # same seed, other pos
    ]
    first = sample([UNIFORM8, *others], [seeded, *other_specs])
    last = sample([*others, UNIFORM8], [*other_specs, seeded])
    middle = sample([others[0], others[1], UNIFORM8, *others[2:]], [*other_specs[:2], seeded, *other_specs[2:]])
    assert first[0][0].token_id == alone
    assert last[-1][0].token_id == alone
    assert middle[2][0].token_id == alone


def test_seeded_draw_depends_on_output_position_not_prompt_length():
    params = SamplingParams(temperature=1.0, seed=3)
    short_prompt = make_spec(params, prompt=(1,), output=(5, 6))
    long_prompt = make_spec(params, prompt=(1, 1, 1, 1, 1, 1, 1), output=(0, 0))
    assert token_of(UNIFORM8, short_prompt) == token_of(UNIFORM8, long_prompt)


def test_seeded_draw_is_repeatable_across_sampler_instances():
    spec = make_spec(SamplingParams(temperature=1.0, seed=11), output=(3,), seq=(2,))
    assert token_of(UNIFORM8, spec, Sampler((EOS,), seed=0)) == token_of(UNIFORM8, spec, Sampler((EOS,), seed=99))


def test_seeded_draws_vary_with_seed_seq_index_and_position():
    by_seed = {token_of(UNIFORM8, make_spec(SamplingParams(temperature=1.0, seed=s))) for s in range(40)}
    by_index = {token_of(UNIFORM8, make_spec(SamplingParams(temperature=1.0, seed=1), seq=(i,))) for i in range(40)}
    by_pos = {token_of(UNIFORM8, make_spec(SamplingParams(temperature=1.0, seed=1), output=(0,) * p)) for p in range(40)}
    # 40 draws from 8 equally likely tokens: a constant input would give one token.
    assert len(by_seed) >= 5
    assert len(by_index) >= 5
    assert len(by_pos) >= 5


# ---- penalties ------------------------------------------------------------------------------


def processed(logits: torch.Tensor, rows: list[tuple[SampleSpec, int]]) -> torch.Tensor:
    """The logits after bias, masks and penalties, as the sampler computes them before drawing."""
    sampler = Sampler((EOS,))
    return sampler._process(logits, rows, sampler._params(rows, logits), [])


def apply_penalties(row, spec: SampleSpec) -> torch.Tensor:
    return processed(torch.tensor([row], dtype=torch.float32), [(spec, 0)])[0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits_exactly():
    row = [2.0, -1.0, 0.5, 3.0, -2.0, 1.0, 0.0]
    spec = make_spec(SamplingParams(repetition_penalty=2.0), prompt=(0, 1, 6), output=(3, 4))
    # seen: 0, 1, 6 (prompt), 3, 4 (output); 2 and 5 unseen; a 0 logit stays 0.
    expected = torch.tensor([1.0, -2.0, 0.5, 1.5, -4.0, 1.0, 0.0])
    assert torch.equal(apply_penalties(row, spec), expected)


def test_repetition_penalty_below_one_boosts_seen_tokens_exactly():
    row = [2.0, -1.0, 0.5]
    spec = make_spec(SamplingParams(repetition_penalty=0.5), prompt=(0,), output=(1,))
    assert torch.equal(apply_penalties(row, spec), torch.tensor([4.0, -0.5, 0.5]))


def test_frequency_and_presence_penalties_subtract_per_output_count_exactly():
    row = [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    spec = make_spec(params, prompt=(0, 1, 5), output=(3, 3, 4, 3))
    # 3 seen three times: 3 - (0.5 * 3 + 0.25); 4 once: -2 - (0.5 + 0.25); prompt-only 0, 1, 5 untouched.
    expected = torch.tensor([2.0, -1.0, 0.5, 1.25, -2.75, 1.0])
    assert torch.equal(apply_penalties(row, spec), expected)


def test_all_penalties_combine_repetition_first_then_subtraction():
    row = [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    spec = make_spec(params, prompt=(0, 1), output=(3, 3, 4))
    # rep: [1, -2, .5, 1.5, -4, 1]; then 3 -= 0.5*2 + 0.25, 4 -= 0.5 + 0.25.
    expected = torch.tensor([1.0, -2.0, 0.5, 0.25, -4.75, 1.0])
    assert torch.equal(apply_penalties(row, spec), expected)


def test_penalties_apply_per_row_of_a_batch():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    rows = [
        (make_spec(SamplingParams(presence_penalty=1.0), prompt=(0,), output=(2,)), 0),
        (make_spec(GREEDY, prompt=(0,), output=(2,)), 0),  # no penalties: untouched
        (make_spec(SamplingParams(repetition_penalty=4.0), prompt=(1,), output=()), 0),
    ]
    out = processed(logits, rows)
    assert torch.equal(out, torch.tensor([[1.0, 2.0, 2.0], [1.0, 2.0, 3.0], [1.0, 0.5, 3.0]]))


def test_repetition_penalty_on_prompt_token_moves_greedy_argmax():
    row = [0.0, 3.0, 2.0, -1.0]
    assert token_of(row, make_spec(SamplingParams(temperature=0.0), prompt=(1,))) == 1
    # 3.0 / 2 = 1.5 < 2.0
    assert token_of(row, make_spec(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=(1,))) == 2


def test_repetition_penalty_on_output_token_moves_greedy_argmax():
    row = [0.0, 3.0, 2.0, -1.0]
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert token_of(row, make_spec(params, prompt=(3,), output=(1,))) == 2


def test_repetition_penalty_multiplies_a_negative_logit():
    row = [-1.0, -1.5, -3.0, -4.0]
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    # -1 * 2 = -2 < -1.5 (dividing would give -0.5 and keep token 0 on top)
    assert token_of(row, make_spec(params, prompt=(0,))) == 1


def test_presence_penalty_ignores_prompt_only_tokens():
    row = [0.0, 3.0, 2.0, -1.0]
    params = SamplingParams(temperature=0.0, presence_penalty=2.0)
    assert token_of(row, make_spec(params, prompt=(1, 1, 1), output=(3,))) == 1
    assert token_of(row, make_spec(params, prompt=(3,), output=(1,))) == 2  # 3 - 2 = 1 < 2


def test_presence_penalty_is_flat_in_count():
    row = [0.0, 3.0, 1.5, -1.0]
    params = SamplingParams(temperature=0.0, presence_penalty=1.0)
    # 3 - 1 = 2 > 1.5 however many times token 1 was produced
    assert token_of(row, make_spec(params, output=(1,))) == 1
    assert token_of(row, make_spec(params, output=(1, 1, 1, 1))) == 1


def test_frequency_penalty_scales_with_count_and_ignores_prompt():
    row = [0.0, 3.0, 2.0, -1.0]
    params = SamplingParams(temperature=0.0, frequency_penalty=0.5)
    assert token_of(row, make_spec(params, prompt=(1, 1, 1, 1))) == 1  # prompt only: untouched
    assert token_of(row, make_spec(params, output=(1,))) == 1  # 3 - 0.5 = 2.5 > 2
    assert token_of(row, make_spec(params, output=(1, 0, 1, 1))) == 2  # 3 - 1.5 = 1.5 < 2


# ---- temperature, min_p, top_k, top_p -------------------------------------------------------


def filtered(row, **kwargs) -> torch.Tensor:
    """The distribution the sampler draws from (its thresholds, from a single candidate, two,
    and the whole row: the same), checked against the per-row reference."""
    params = SamplingParams(**kwargs)
    x = torch.tensor([row], dtype=torch.float32) / params.temperature
    f = _filters(DrawValues.of([params], len(row)), torch.device("cpu"))
    results = []
    for width in (max(1, f.max_k), max(2, f.max_k), len(row)):
        t = ops.thresholds(x, f, width)
        if t.resolved is not None and not bool(t.resolved.all()):
            t = ops.thresholds(x, f, len(row))
        w = ops.kept_weights(x, t.threshold, f.min_p)[0]
        results.append(w / w.sum())
    for probs in results[1:]:
        assert torch.equal(probs, results[0])
    reference = reference_probs(torch.tensor(row, dtype=torch.float32), params)
    assert (results[0] == 0).tolist() == (reference == 0).tolist()
    torch.testing.assert_close(results[0], reference, rtol=1e-6, atol=1e-7)
    return results[0]


def test_no_filters_is_plain_softmax():
    assert_probs(filtered(QUARTERS), [0.5, 0.25, 0.125, 0.125])


def test_top_k_and_top_p_disabled_values_keep_everything():
    for kwargs in ({"top_k": -1}, {"top_k": 0}, {"top_k": 4}, {"top_k": 50}, {"top_p": 1.0}):
        assert_probs(filtered(QUARTERS, **kwargs), [0.5, 0.25, 0.125, 0.125])


def test_temperature_scales_logits_before_softmax():
    # logits (2 ln2, ln2, 0, 0) / 0.5 -> weights 16, 4, 1, 1; / 2 -> 2, sqrt2, 1, 1
    assert_probs(filtered(QUARTERS, temperature=0.5), [16 / 22, 4 / 22, 1 / 22, 1 / 22])
    s = 2 + math.sqrt(2) + 2
    assert_probs(filtered(QUARTERS, temperature=2.0), [2 / s, math.sqrt(2) / s, 1 / s, 1 / s])


def test_top_k_keeps_the_k_highest():
    assert_probs(filtered(HALVING, top_k=2), [2 / 3, 1 / 3, 0, 0, 0])
    assert_probs(filtered(HALVING, top_k=3), softmax_kept(HALVING, [0, 1, 2]))


def test_top_k_keeps_ties_with_the_kth():
    row = [3.0, 2.0, 2.0, 1.0, 2.0, 0.0]
    assert_probs(filtered(row, top_k=2), softmax_kept(row, [0, 1, 2, 4]))
    assert_probs(filtered(row, top_k=1), softmax_kept(row, [0]))


def test_min_p_drops_tokens_below_fraction_of_top_probability():
    # top prob 0.5: min_p 0.3 -> threshold 0.15 drops the 0.125s
    assert_probs(filtered(QUARTERS, min_p=0.3), [2 / 3, 1 / 3, 0, 0])
    # min_p 0.5 -> threshold 0.25 relative to the top, not absolute 0.5: the 0.25 token stays
    assert_probs(filtered(QUARTERS, min_p=0.5), [2 / 3, 1 / 3, 0, 0])


def test_min_p_keeps_a_token_exactly_at_the_threshold():
    # threshold 0.25 * 0.5 = 0.125: "below" drops nothing
    assert_probs(filtered(QUARTERS, min_p=0.25), [0.5, 0.25, 0.125, 0.125])


def test_min_p_of_one_keeps_only_the_top():
    assert_probs(filtered(QUARTERS, min_p=1.0), [1.0, 0, 0, 0])


def test_min_p_applies_to_temperature_scaled_probabilities():
    # at temperature 2 the weights are 2, sqrt2, 1, 1: 1/2 >= 0.3 so all stay
    s = 2 + math.sqrt(2) + 2
    assert_probs(filtered(QUARTERS, min_p=0.3, temperature=2.0), [2 / s, math.sqrt(2) / s, 1 / s, 1 / s])


def test_top_p_keeps_the_top_token_even_when_it_alone_exceeds_p():
    assert_probs(filtered(HALVING, top_p=0.1), [1.0, 0, 0, 0, 0])
    assert_probs(filtered(HALVING, top_p=0.49), [1.0, 0, 0, 0, 0])


def test_top_p_drops_a_token_whose_preceding_mass_equals_p():
    # mass before token 1 is 0.5 == p: 0.5 already reaches p
    assert_probs(filtered(HALVING, top_p=0.5), [1.0, 0, 0, 0, 0])
    # mass before token 2 is 0.75 == p
    assert_probs(filtered(HALVING, top_p=0.75), [2 / 3, 1 / 3, 0, 0, 0])
    # mass before token 3 is 0.875 == p
    assert_probs(filtered(HALVING, top_p=0.875), [4 / 7, 2 / 7, 1 / 7, 0, 0])


def test_top_p_keeps_tokens_until_mass_reaches_p():
    assert_probs(filtered(HALVING, top_p=0.51), [2 / 3, 1 / 3, 0, 0, 0])
    assert_probs(filtered(HALVING, top_p=0.76), [4 / 7, 2 / 7, 1 / 7, 0, 0])
    assert_probs(filtered(HALVING, top_p=0.8), [4 / 7, 2 / 7, 1 / 7, 0, 0])


def test_top_p_counts_mass_after_top_k_renormalises():
    # alone, top_p 0.6 keeps {0, 1} (mass before token 1 is 0.5)
    assert_probs(filtered(QUARTERS, top_p=0.6), [2 / 3, 1 / 3, 0, 0])
    # after top_k 2 the kept probs are 2/3, 1/3: mass before token 1 is 2/3 >= 0.6
    assert_probs(filtered(QUARTERS, top_k=2, top_p=0.6), [1.0, 0, 0, 0])


def test_top_p_counts_mass_after_min_p_renormalises():
    # min_p 0.3 leaves 2/3, 1/3; top_p 0.6 then drops token 1
    assert_probs(filtered(QUARTERS, min_p=0.3, top_p=0.6), [1.0, 0, 0, 0])


def test_top_p_applies_to_temperature_scaled_probabilities():
    # at temperature 0.5 the top prob is 16/22 > 0.7, so top_p 0.7 keeps it alone
    assert_probs(filtered(QUARTERS, temperature=0.5, top_p=0.7), [1.0, 0, 0, 0])
    # at temperature 1 the top prob is 0.5 < 0.7
    assert_probs(filtered(QUARTERS, top_p=0.7), [2 / 3, 1 / 3, 0, 0])


# ---- draw frequencies -----------------------------------------------------------------------


def empirical(row, params: SamplingParams, draws: int = 4000) -> list[float]:
    spec = make_spec(params, seq=tuple(range(draws)))
    counts = Counter(tokens_of(row, spec, Sampler((EOS,), seed=0)))
    return [counts[t] / draws for t in range(len(row))]


def test_unseeded_draw_frequencies_match_probabilities():
    probs = [0.5, 0.3, 0.2]
    freqs = empirical([math.log(p) for p in probs], SamplingParams(temperature=1.0))
    assert freqs == pytest.approx(probs, abs=0.03)


def test_draw_frequencies_follow_the_filtered_distribution():
    probs = [0.5, 0.3, 0.2]
    freqs = empirical([math.log(p) for p in probs], SamplingParams(temperature=1.0, top_k=2))
    assert freqs[2] == 0.0
    assert freqs == pytest.approx([0.625, 0.375, 0.0], abs=0.03)


def test_seeded_draw_frequencies_over_seeds_match_probabilities():
    probs = [0.5, 0.3, 0.2]
    row = [math.log(p) for p in probs]
    specs = [make_spec(SamplingParams(temperature=1.0, seed=s)) for s in range(2000)]
    counts = Counter(g[0].token_id for g in sample([row] * len(specs), specs))
    assert [counts[t] / len(specs) for t in range(3)] == pytest.approx(probs, abs=0.04)


# ---- min_tokens -----------------------------------------------------------------------------


def test_min_tokens_masks_eos_until_reached_even_as_top_logit():
    row = [0.0, 1.0, 10.0, 0.5, 0.0, 0.0]
    params = SamplingParams(temperature=0.0, min_tokens=3)
    assert [token_of(row, make_spec(params, output=(1,) * pos)) for pos in range(5)] == [1, 1, 1, 2, 2]


def test_min_tokens_masks_eos_in_random_draws():
    row = [0.0, 0.0, 10.0, 0.0, 0.0, 0.0]  # EOS has probability ~0.9998 unmasked
    params = SamplingParams(temperature=1.0, min_tokens=2)
    before = tokens_of(row, make_spec(params, output=(1,), seq=tuple(range(200))))
    after = tokens_of(row, make_spec(params, output=(1, 1), seq=tuple(range(200))))
    assert EOS not in before
    assert after.count(EOS) >= 190


def test_min_tokens_masks_every_eos_id():
    row = [0.0, 1.0, 10.0, 0.5, 9.0, 0.0]
    params = SamplingParams(temperature=0.0, min_tokens=1)
    assert token_of(row, make_spec(params), Sampler(eos_token_ids=(2, 4))) == 1


def test_min_tokens_masks_stop_token_ids():
    row = [0.0, 1.0, 0.0, 0.5, 0.0, 10.0]
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[5])
    assert token_of(row, make_spec(params, output=(0,))) == 1
    assert token_of(row, make_spec(params, output=(0, 0))) == 5


def test_min_tokens_with_ignore_eos_leaves_eos_but_masks_stop_token_ids():
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(5,), ignore_eos=True)
    assert token_of([0.0, 1.0, 10.0, 0.5, 0.0, 0.0], make_spec(params)) == EOS
    assert token_of([0.0, 1.0, 9.0, 0.5, 0.0, 10.0], make_spec(params)) == EOS


def test_min_tokens_zero_masks_nothing():
    row = [0.0, 1.0, 10.0, 0.5, 0.0, 0.0]
    assert token_of(row, make_spec(SamplingParams(temperature=0.0))) == EOS


# ---- logprobs -------------------------------------------------------------------------------

LP_ROW = [1.0, 3.0, 2.0, 0.5, -1.0, 0.0]


def raw_logprobs(row) -> list[float]:
    return torch.log_softmax(torch.tensor([row], dtype=torch.float32), dim=-1)[0].tolist()


def sampled(row, spec: SampleSpec, sampler: Sampler | None = None) -> SampledToken:
    (group,) = sample(row, [spec], sampler)
    (tok,) = group
    return tok


def test_no_logprobs_unless_asked():
    assert sampled(LP_ROW, make_spec(GREEDY)).logprobs is None


def test_logprobs_hold_sampled_token_and_top_n_with_raw_values_and_ranks():
    lp = raw_logprobs(LP_ROW)
    tok = sampled(LP_ROW, make_spec(SamplingParams(temperature=0.0, logprobs=2)))
    assert tok.token_id == 1
    assert tok.logprobs == {1: Logprob(pytest.approx(lp[1], abs=1e-6), 1), 2: Logprob(pytest.approx(lp[2], abs=1e-6), 2)}


def test_logprobs_zero_holds_only_the_sampled_token():
    lp = raw_logprobs(LP_ROW)
    tok = sampled(LP_ROW, make_spec(SamplingParams(temperature=0.0, logprobs=0)))
    assert tok.logprobs == {1: Logprob(pytest.approx(lp[1], abs=1e-6), 1)}


def test_logprobs_rank_and_value_of_a_penalised_sampled_token_are_raw():
    lp = raw_logprobs(LP_ROW)
    # repetition penalty 4 on tokens 1, 2: 3/4 and 2/4 fall below token 0 (1.0), which is raw rank 3
    params = SamplingParams(temperature=0.0, repetition_penalty=4.0, logprobs=2)
    tok = sampled(LP_ROW, make_spec(params, prompt=(1, 2)))
    assert tok.token_id == 0
    assert set(tok.logprobs) == {0, 1, 2}
    assert tok.logprobs[0].rank == 3
    assert tok.logprobs[0].logprob == pytest.approx(lp[0], abs=1e-6)
    assert tok.logprobs[1] == Logprob(pytest.approx(lp[1], abs=1e-6), 1)
    assert tok.logprobs[2] == Logprob(pytest.approx(lp[2], abs=1e-6), 2)


def test_logprobs_of_a_min_tokens_masked_eos_stay_raw():
    row = [0.0, 1.0, 10.0, 0.5, 0.0, 0.0]
    lp = raw_logprobs(row)
    tok = sampled(row, make_spec(SamplingParams(temperature=0.0, min_tokens=1, logprobs=1)))
    assert tok.token_id == 1
    assert tok.logprobs == {
        1: Logprob(pytest.approx(lp[1], abs=1e-6), 2),
        EOS: Logprob(pytest.approx(lp[EOS], abs=1e-6), 1),
    }
    assert math.isfinite(tok.logprobs[EOS].logprob)


def test_logprobs_ignore_temperature():
    lp = raw_logprobs(LP_ROW)
    spec = make_spec(SamplingParams(temperature=0.25, logprobs=1, seed=5), seq=(0,))
    tok = sampled(LP_ROW, spec)
    order = sorted(range(len(LP_ROW)), key=lambda t: -LP_ROW[t])
    assert tok.logprobs[tok.token_id] == Logprob(pytest.approx(lp[tok.token_id], abs=1e-6), order.index(tok.token_id) + 1)
    assert tok.logprobs[1] == Logprob(pytest.approx(lp[1], abs=1e-6), 1)


def test_logprobs_per_spec_in_a_mixed_batch():
    lp = raw_logprobs(LP_ROW)
    out = sample(
        [LP_ROW, LP_ROW],
        [make_spec(GREEDY), make_spec(SamplingParams(temperature=0.0, logprobs=1))],
    )
    assert out[0][0].logprobs is None
    assert out[1][0].logprobs == {1: Logprob(pytest.approx(lp[1], abs=1e-6), 1)}


# ---- n > 1 fork -----------------------------------------------------------------------------


def test_fork_draws_one_token_per_seq_index_each_as_if_alone():
    params = SamplingParams(temperature=1.0, seed=2024)
    forked = tokens_of(UNIFORM8, make_spec(params, output=(3, 3), seq=(0, 1, 2, 3)))
    alone = [token_of(UNIFORM8, make_spec(params, output=(3, 3), seq=(i,))) for i in range(4)]
    assert len(forked) == 4
    assert forked == alone
    assert len(set(forked)) > 1  # the indices really draw differently


def test_fork_beside_other_specs_keeps_groups_in_order():
    params = SamplingParams(temperature=0.0)
    out = sample(
        [[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]],
        [make_spec(params), make_spec(params, seq=(0, 1, 2)), make_spec(params, seq=(0, 1))],
    )
    assert [[t.token_id for t in g] for g in out] == [[1], [2, 2, 2], [0, 0]]


def test_fork_applies_penalties_and_logprobs_to_every_copy():
    lp = raw_logprobs(LP_ROW)
    params = SamplingParams(temperature=0.0, repetition_penalty=4.0, logprobs=0)
    group = sample(LP_ROW, [make_spec(params, prompt=(1, 2), seq=(0, 1, 2))])[0]
    assert [t.token_id for t in group] == [0, 0, 0]
    assert all(t.logprobs == {0: Logprob(pytest.approx(lp[0], abs=1e-6), 3)} for t in group)


# ---- allowed_token_ids and bad_words -------------------------------------------------------------


def test_allowed_token_ids_make_greedy_pick_the_best_allowed_token():
    assert token_of(HALVING, make_spec(SamplingParams(temperature=0.0, allowed_token_ids=[2, 4]))) == 2


def test_allowed_token_ids_draws_follow_the_renormalised_allowed_distribution():
    probs = [0.5, 0.3, 0.2]
    freqs = empirical([math.log(p) for p in probs], SamplingParams(temperature=1.0, allowed_token_ids=[1, 2]))
    assert freqs[0] == 0.0
    assert freqs == pytest.approx([0.0, 0.6, 0.4], abs=0.03)


def test_allowed_token_ids_apply_to_their_row_only():
    out = sample([HALVING, HALVING], [make_spec(SamplingParams(temperature=0.0, allowed_token_ids=[3])), make_spec()])
    assert [g[0].token_id for g in out] == [3, 0]


def bad_spec(words: tuple[tuple[int, ...], ...], output: tuple[int, ...] = (), params: SamplingParams = GREEDY):
    return SampleSpec(params=params, seq_indices=(0,), num_prompt_tokens=1, token_ids=[7, *output], bad_words=words)


def test_a_one_token_bad_word_is_never_sampled():
    assert token_of(HALVING, bad_spec(((0,),))) == 1
    freqs = Counter(token_of(HALVING, bad_spec(((0,), (1,)), params=SamplingParams(temperature=1.0, seed=s)))
                    for s in range(200))
    assert set(freqs) <= {2, 3, 4} and len(freqs) == 3


def test_a_longer_bad_word_bans_its_last_token_only_after_its_other_tokens():
    word = ((3, 4, 0),)
    assert token_of(HALVING, bad_spec(word, output=(3, 4))) == 1  # the word would complete: 0 is banned
    assert token_of(HALVING, bad_spec(word, output=(4, 3))) == 0  # another order: nothing banned
    assert token_of(HALVING, bad_spec(word, output=(4,))) == 0  # half the head: nothing banned


def test_bad_words_look_at_the_output_not_the_prompt():
    spec = SampleSpec(params=GREEDY, seq_indices=(0,), num_prompt_tokens=2, token_ids=[3, 4], bad_words=((3, 4, 0),))
    assert token_of(HALVING, spec) == 0


def test_a_graph_draw_kept_across_steps_takes_each_steps_output_positions():
    """Sampler.in_graph keeps a batch's staged values while the list of specs stays the same
    objects; the uniforms still follow each row's live output position, and a new list is
    staged afresh: each step's values are a fresh sampler's for that step."""
    cpu = torch.device("cpu")
    seeded = make_spec(SamplingParams(temperature=0.8, top_k=5, seed=11), output=(3,))
    greedy = make_spec(GREEDY, output=(4, 4))
    hot = make_spec(SamplingParams(temperature=1.5, seed=12), prompt=(7, 7, 7))
    kept = Sampler(eos_token_ids=(EOS,), seed=0)
    steps = [[seeded, greedy, hot], [seeded, greedy, hot], [hot, seeded], [hot, seeded]]
    seen = []
    for specs in steps:
        staged = kept.in_graph(specs, 8, cpu)
        fresh = Sampler(eos_token_ids=(EOS,), seed=0).in_graph(specs, 8, cpu)
        for name in ("temperature", "uniforms", "top_k", "top_p", "min_p"):
            np.testing.assert_array_equal(getattr(staged, name), getattr(fresh, name), err_msg=name)
        seen.append(staged.uniforms.copy())
        for spec in specs:
            spec.token_ids.append(5)  # the step's token: one more output position
    assert seen[1][0] != seen[0][0] and seen[1][2] != seen[0][2]  # new positions, new uniforms
    assert seen[0][1] == 0.0 and seen[0][0] > 0.0
    assert kept.in_graph([greedy, greedy], 8, cpu) is None  # plain greedy: the argmax graph
