"""SamplingParams validation at the edge: every bad value is an InvalidRequestError naming its field."""

from __future__ import annotations

import re

import pytest

from services.engine.errors import InvalidRequestError
from services.engine.sampling_params import MAX_LOGPROBS, MAX_N, MAX_STOP_STRINGS, SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"n": 0}, "n"),
        ({"n": MAX_N + 1}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": ["s"] * (MAX_STOP_STRINGS + 1)}, "stop strings"),
        ({"stop": ["ok", ""]}, "stop strings"),
        ({"stop": ""}, "stop strings"),
        ({"stop_token_ids": [3, -1]}, "stop_token_ids"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
    ],
)
def test_invalid_value_raises_invalid_request_naming_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError, match=rf"\b{re.escape(field)}\b") as info:
        SamplingParams(**kwargs)
    assert info.type is InvalidRequestError


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"top_p": 1.0},
        {"top_p": 1e-6},
        {"top_k": -1},
        {"top_k": 0},
        {"top_k": 1},
        {"n": 1},
        {"n": MAX_N},
        {"max_tokens": 1},
        {"min_tokens": 7, "max_tokens": 7},
        {"logprobs": 0},
        {"logprobs": MAX_LOGPROBS},
        {"stop": ["s"] * MAX_STOP_STRINGS},
        {"stop_token_ids": [0]},
        {"presence_penalty": 2.0},
        {"presence_penalty": -2.0},
        {"frequency_penalty": -2.0},
        {"min_p": 1.0},
        {"seed": 0},
        {"seed": 2**63 - 1},
    ],
)
def test_valid_edge_value_is_accepted(kwargs):
    params = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        if isinstance(value, list):
            value = tuple(value)
        assert getattr(params, name) == value


def test_stop_string_becomes_one_element_tuple():
    assert SamplingParams(stop="x").stop == ("x",)


def test_stop_lists_become_tuples():
    params = SamplingParams(stop=["a", "bc"], stop_token_ids=[5, 7])
    assert params.stop == ("a", "bc")
    assert params.stop_token_ids == (5, 7)


def test_params_are_hashable_after_list_inputs():
    a = SamplingParams(stop=["a"], stop_token_ids=[5])
    b = SamplingParams(stop=("a",), stop_token_ids=(5,))
    assert a == b
    assert hash(a) == hash(b)


def test_stop_strings_need_detokenize():
    with pytest.raises(InvalidRequestError, match="detokenize"):
        SamplingParams(stop="x", detokenize=False)


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [
        ({"temperature": 0.0}, True),
        ({"temperature": 0.0, "top_k": 5}, True),
        ({"temperature": 1.0, "top_k": 1}, True),
        ({"temperature": 0.7, "top_k": 1}, True),
        ({"temperature": 1.0}, False),
        ({"temperature": 1e-3}, False),
        ({"temperature": 1.0, "top_k": 2}, False),
        ({"temperature": 1.0, "top_p": 1e-6}, False),
    ],
)
def test_greedy_for_temperature_zero_or_top_k_one(kwargs, greedy):
    assert SamplingParams(**kwargs).greedy is greedy


@pytest.mark.parametrize(
    ("kwargs", "needs"),
    [
        ({}, False),
        ({"repetition_penalty": 1.1}, True),
        ({"presence_penalty": 0.5}, True),
        ({"frequency_penalty": -0.5}, True),
    ],
)
def test_needs_penalties_only_when_a_penalty_is_set(kwargs, needs):
    assert SamplingParams(**kwargs).needs_penalties is needs
