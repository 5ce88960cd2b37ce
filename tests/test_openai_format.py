"""Streaming chunks from templates (issue #32): a text delta's SSE event must be, byte for
byte, what rendering the chunk's dict gives, for both endpoints, with and without usage, and
for text that JSON escapes."""

from __future__ import annotations

import json

import pytest

from pdserve.v1 import common_pb2
from router.openai_format import ChoiceState, ResponseFormat, TokenStrings, sse


def fmt(kind: str, echo: list[str] | None = None, top_logprobs: int | None = None) -> ResponseFormat:
    return ResponseFormat(kind, 'id-"1"', "m\\odel", TokenStrings(None), top_logprobs, [7], echo)


@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("text", ["hello", 'quote " back \\ new\nline', "é😀\u2028", "-987654321"])
def test_a_text_delta_renders_as_its_chunk_would(kind, include_usage, text):
    f, state = fmt(kind), ChoiceState(3)
    delta = common_pb2.CompletionDelta(index=0, text=text, token_ids=[5])
    expected = sse(f.chunk([f.delta_choice(ChoiceState(3), delta, 1)], include_usage))
    assert f.delta_event(state, delta, 1, include_usage) == expected
    assert f.delta_event(state, delta, 1, include_usage) == expected  # the cached template
    assert state.started and state.text == ""  # streaming keeps no text


def test_a_delta_without_text_sends_nothing_and_a_finish_carries_its_reasons():
    f, state = fmt("completion"), ChoiceState(0)
    assert f.delta_event(state, common_pb2.CompletionDelta(token_ids=[5]), 1, False) is None
    event = f.delta_event(state, common_pb2.CompletionDelta(token_ids=[7], finish_reason="stop", stop_reason="7"),
                          1, False)
    choice = json.loads(event.removeprefix("data: "))["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == ("", "stop", 7)


def test_echo_and_logprobs_take_the_general_path():
    f, state = fmt("completion", echo=["say: "]), ChoiceState(0)
    first = f.delta_event(state, common_pb2.CompletionDelta(text="hi", token_ids=[5]), 1, False)
    second = f.delta_event(state, common_pb2.CompletionDelta(text="!", token_ids=[6]), 1, False)
    assert json.loads(first[6:])["choices"][0]["text"] == "say: hi"
    assert json.loads(second[6:])["choices"][0]["text"] == "!"
    position = common_pb2.PositionLogprobs(entries=[common_pb2.TokenLogprob(token_id=5, logprob=-0.5, rank=1)])
    f, state = fmt("completion", top_logprobs=1), ChoiceState(0)
    event = f.delta_event(state, common_pb2.CompletionDelta(text="x", token_ids=[5], logprobs=[position]), 1, False)
    assert json.loads(event[6:])["choices"][0]["logprobs"]["token_logprobs"] == [-0.5]
