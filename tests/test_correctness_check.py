"""loadtest/correctness.py: issue #4's greedy-agreement criterion (exact cases), and one CPU run
of the comparison on a tiny model."""

from __future__ import annotations

import torch

from loadtest.correctness import Reference, compare, first_near_tie, passes


def row(top: float, second: float, vocab: int = 6) -> torch.Tensor:
    r = torch.full((vocab,), -100.0)
    r[3], r[1] = top, second
    return r


def test_the_first_near_tie_is_the_first_top2_gap_below_one_percent_of_the_top_logit():
    assert first_near_tie([row(10, 5), row(10, 9.95), row(10, 9.0)]) == 1  # 0.05 < 0.1
    assert first_near_tie([row(-10, -10.05), row(10, 9)]) == 0  # |top| for negative logits
    assert first_near_tie([row(10, 9.9), row(10, 9)]) == 2  # 0.1 is not below 0.1: no tie


def test_a_prompt_passes_when_it_agrees_up_to_the_near_tie_whatever_follows():
    ref = Reference([5, 6, 7, 8], first_near_tie=2)
    assert passes([5, 6, 9, 9], ref)  # flips at the near-tie: allowed
    assert not passes([5, 9, 7, 8], ref)  # flips before it
    assert not passes([5, 6, 7, 8], Reference([5, 6, 7, 9], first_near_tie=4))  # no tie: all must agree
    assert Reference([1] * 31 + [2], 32).degenerate and not Reference(list(range(32)), 32).degenerate


def test_pdserve_and_hf_eager_agree_with_hf_in_float32_on_the_cpu():
    result = compare("tiny-llama", 0.02, num_prompts=3, new_tokens=12, dtype=torch.float32)
    assert result["degenerate_references"] == 0
    assert [(s["system"], s["pass_rate"], s["mean_tokens_agreeing"]) for s in result["systems"]] == [
        ("pdserve (torch)", 1.0, 12.0), ("hf eager (the ceiling)", 1.0, 12.0)]
