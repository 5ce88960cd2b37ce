"""Draw frequencies against the exact reference distribution (tests/sampling_reference.py).

Each case draws N = 20,000 tokens from an 8-token vocabulary with fixed seeds (so every
p-value below is a fixed number) and runs Pearson's chi-square test against the reference
distribution of its parameters: it passes at p > 1e-3. Each case has two controls that must
fail, so the test can see what it claims to check:
  * the same draws against the distribution without the case's filter (p < 1e-6);
  * the reference with 2% of the probability moved between two kept tokens (p < 1e-3): the
    power to see a 2% shift.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.engine import sampler as sampler_module
from services.engine.sampler import Sampler
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import SampleSpec
from tests.sampling_reference import reference_probs

N = 20_000
LOGITS = [2.0, 1.5, 1.2, 0.8, 0.5, 0.1, -0.3, -1.0]
EOS = 7

# (case, its parameters, the same without the filter under test)
CASES = {
    "temperature 0.6": (dict(temperature=0.6), dict(temperature=1.0)),
    "temperature 1.5": (dict(temperature=1.5), dict(temperature=1.0)),
    "top_k 3": (dict(top_k=3), dict()),
    "top_p 0.8": (dict(top_p=0.8), dict()),
    "min_p 0.2": (dict(min_p=0.2), dict()),
    "T 0.8 top_k 4 top_p 0.7": (dict(temperature=0.8, top_k=4, top_p=0.7), dict(temperature=0.8)),
    "min_p 0.1 top_p 0.9": (dict(min_p=0.1, top_p=0.9), dict()),
    "T 0.7 min_p 0.05 top_k 5 top_p 0.85": (dict(temperature=0.7, min_p=0.05, top_k=5, top_p=0.85),
                                             dict(temperature=0.7)),
}


def chi_square_p(counts: np.ndarray, probs: torch.Tensor) -> float:
    """Pearson's test of `counts` against `probs`; 0.0 if a token of probability 0 was drawn."""
    probs = probs.double().numpy()
    if counts[probs == 0].any():
        return 0.0
    kept = probs > 0
    expected = probs[kept] * counts.sum()
    stat = float(((counts[kept] - expected) ** 2 / expected).sum())
    df = int(kept.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64))) if df else 1.0


def shifted(probs: torch.Tensor, amount: float = 0.02) -> torch.Tensor:
    """`amount` of probability moved from the most to the least likely kept token."""
    out = probs.clone().double()
    kept = torch.nonzero(out > 0)[:, 0]
    top, low = kept[out[kept].argmax()], kept[out[kept].argmin()]
    out[top] -= amount
    out[low] += amount
    return out


def spec_of(params: SamplingParams, rows: int, output: tuple[int, ...] = ()) -> SampleSpec:
    return SampleSpec(params=params, seq_indices=tuple(range(rows)), num_prompt_tokens=1, token_ids=[0, *output])


def draw_counts(specs: list[SampleSpec], logits: list[float] = LOGITS, seed: int = 0,
                device: str = "cpu") -> list[np.ndarray]:
    """Per spec, how often each token was drawn (one sampler call for every spec at once)."""
    rows = torch.tensor([logits] * len(specs), dtype=torch.float32, device=device)
    groups = Sampler((EOS,), seed=seed)(rows, specs)
    return [np.bincount([t.token_id for t in g], minlength=len(logits)) for g in groups]


def assert_matches_only(counts: np.ndarray, probs: torch.Tensor, control: torch.Tensor) -> None:
    assert chi_square_p(counts, probs) > 1e-3
    assert chi_square_p(counts, control) < 1e-6  # negative control: the filter is visible
    assert chi_square_p(counts, shifted(probs)) < 1e-3  # power: a 2% shift is visible


def references(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    kwargs, without = CASES[case]
    logits = torch.tensor(LOGITS)
    return reference_probs(logits, SamplingParams(**kwargs)), reference_probs(logits, SamplingParams(**without))


@pytest.mark.parametrize("candidates", [256, 2], ids=["whole-row candidates", "two candidates, widened"])
@pytest.mark.parametrize("case", list(CASES))
def test_draw_frequencies_match_the_reference_distribution(case, candidates, monkeypatch):
    monkeypatch.setattr(sampler_module, "CANDIDATES", candidates)
    (counts,) = draw_counts([spec_of(SamplingParams(**CASES[case][0]), N)])
    assert_matches_only(counts, *references(case))


def test_every_case_in_one_mixed_batch_draws_its_own_distribution():
    specs = [spec_of(SamplingParams(**kwargs), N // 4) for kwargs, _ in CASES.values()]
    specs.append(spec_of(SamplingParams(temperature=0.0), 100))  # greedy rows beside them
    *counts, greedy = draw_counts(specs, seed=1)
    for case, c in zip(CASES, counts, strict=True):
        probs, _ = references(case)
        assert chi_square_p(c, probs) > 1e-3, case
    assert greedy.tolist() == [100] + [0] * 7


def test_seeded_draws_over_many_seeds_match_the_reference():
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=s) for s in range(N)]
    counts = np.bincount([g[0].token_id for g in Sampler((EOS,))(
        torch.tensor([LOGITS] * N), [spec_of(p, 1) for p in params])], minlength=8)
    logits = torch.tensor(LOGITS)
    probs = reference_probs(logits, params[0])
    assert_matches_only(counts, probs, reference_probs(logits, SamplingParams(temperature=0.8)))


def test_logit_bias_shifts_the_distribution_exactly():
    bias = {1: 1.0, 4: -2.0, 6: 0.7}
    (counts,) = draw_counts([spec_of(SamplingParams(logit_bias=bias), N)])
    biased = torch.tensor(LOGITS)
    for t, b in bias.items():
        biased[t] += b
    assert_matches_only(counts, torch.softmax(biased, -1), torch.softmax(torch.tensor(LOGITS), -1))


def test_penalties_change_the_distribution_as_the_reference_computes():
    params = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.3, presence_penalty=0.2)
    output = (0, 0, 3, 5)  # prompt token 0 too
    (counts,) = draw_counts([spec_of(params, N, output)])
    expected = torch.tensor(LOGITS)
    for t in (0, 3, 5):  # seen: repetition first
        expected[t] = expected[t] / 1.5 if expected[t] > 0 else expected[t] * 1.5
    for t, c in ((0, 2), (3, 1), (5, 1)):
        expected[t] -= 0.3 * c + 0.2
    assert_matches_only(counts, torch.softmax(expected, -1), torch.softmax(torch.tensor(LOGITS), -1))


def test_the_statistic_rejects_a_sampler_that_ignores_top_p():
    """The whole test on a sampler with top_p turned into a no-op must fail."""
    kwargs, _ = CASES["top_p 0.8"]
    (counts,) = draw_counts([spec_of(SamplingParams(temperature=1.0), N)])  # what a broken top_p draws
    probs, _ = references("top_p 0.8")
    assert chi_square_p(counts, probs) == 0.0  # it draws tokens top_p removes
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-6)
