"""The OpenAI API's translation layer without a server: request bodies -> GenerateRequests,
decode deltas -> response bodies and chunks, errors -> OpenAI's error shape."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from pdserve.v1 import common_pb2
from router import openai_protocol as protocol
from router.openai_api import error_body, merge
from router.openai_format import ChoiceState, ResponseFormat, Usage
from services.engine.errors import InvalidRequestError, NotFoundError

MAX_LEN = 512


def completion(**kw) -> protocol.CompletionRequest:
    return protocol.CompletionRequest(**({"model": "m", "prompt": "hi"} | kw))


def chat(**kw) -> protocol.ChatCompletionRequest:
    return protocol.ChatCompletionRequest(**({"model": "m", "messages": [{"role": "user", "content": "hi"}]} | kw))


def test_sampling_fields_reach_the_wire_with_their_values():
    body = completion(n=3, temperature=0.5, top_p=0.9, seed=7, stop="END", max_tokens=20, logprobs=2,
                      top_k=5, min_p=0.1, repetition_penalty=1.1, ignore_eos=True, logit_bias={"17": -3.5})
    (msg,) = protocol.completion_requests(body, "cmpl-1", MAX_LEN)
    s = msg.sampling
    assert (s.n, s.temperature, s.top_p, s.seed, list(s.stop), s.max_tokens, s.logprobs) == (3, 0.5, 0.9, 7, ["END"], 20, 2)
    assert (s.top_k, s.min_p, s.repetition_penalty, s.ignore_eos, dict(s.logit_bias)) == (5, 0.1, 1.1, True, {17: -3.5})
    assert (msg.request_id, msg.text, msg.model) == ("cmpl-1", "hi", "m")
    assert not s.HasField("presence_penalty") and not s.HasField("structured_output")


def test_max_tokens_defaults_to_16_for_completions_the_context_for_chat_and_max_completion_tokens_wins():
    (msg,) = protocol.completion_requests(completion(), "c", MAX_LEN)
    assert msg.sampling.max_tokens == 16
    assert protocol.chat_request(chat(), "c", MAX_LEN).sampling.max_tokens == MAX_LEN
    assert protocol.chat_request(chat(max_tokens=9, max_completion_tokens=4), "c", MAX_LEN).sampling.max_tokens == 4


def test_each_prompt_of_a_batch_is_its_own_request():
    texts = protocol.completion_requests(completion(prompt=["a", "b"]), "c", MAX_LEN)
    assert [(m.request_id, m.text) for m in texts] == [("c-0", "a"), ("c-1", "b")]
    (ids,) = protocol.completion_requests(completion(prompt=[5, 6, 7]), "c", MAX_LEN)
    assert list(ids.token_ids.ids) == [5, 6, 7]
    batch = protocol.completion_requests(completion(prompt=[[1, 2], [3]]), "c", MAX_LEN)
    assert [list(m.token_ids.ids) for m in batch] == [[1, 2], [3]]


@pytest.mark.parametrize(
    "body, expected",
    [
        (dict(response_format={"type": "json_object"}), common_pb2.StructuredOutput(json_object=True)),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
         common_pb2.StructuredOutput(json_schema='{"type": "object"}')),
        (dict(guided_json={"type": "integer"}), common_pb2.StructuredOutput(json_schema='{"type": "integer"}')),
        (dict(guided_regex="a+"), common_pb2.StructuredOutput(regex="a+")),
        (dict(guided_grammar='root ::= "a"'), common_pb2.StructuredOutput(grammar='root ::= "a"')),
        (dict(guided_choice=["x", "y"]), common_pb2.StructuredOutput(choice=common_pb2.Choices(choices=["x", "y"]))),
    ],
)
def test_each_structured_output_option_becomes_one_constraint(body, expected):
    assert protocol.structured_output_of(chat(**body)) == expected


def test_text_response_format_constrains_nothing():
    assert protocol.structured_output_of(chat(response_format={"type": "text"})) is None


def test_two_constraints_at_once_are_rejected():
    with pytest.raises(InvalidRequestError, match="only one of response_format, guided_regex"):
        protocol.structured_output_of(chat(response_format={"type": "json_object"}, guided_regex="a"))


def test_chat_messages_keep_roles_join_text_parts_and_send_developer_as_system():
    body = chat(messages=[{"role": "developer", "content": "be brief"},
                          {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": None, "tool_calls": []}])
    msg = protocol.chat_request(body, "c", MAX_LEN)
    assert [(m.role, m.content) for m in msg.chat.messages] == [("system", "be brief"), ("user", "a\nb"), ("assistant", "")]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: protocol.chat_request(chat(top_logprobs=2), "c", MAX_LEN), "needs logprobs=true"),
        (lambda: protocol.completion_requests(completion(seed=-1), "c", MAX_LEN), "seed=-1 is out of range"),
        (lambda: protocol.completion_requests(completion(suffix="x"), "c", MAX_LEN), "suffix"),
        (lambda: protocol.completion_requests(completion(echo=True, logprobs=1), "c", MAX_LEN), "echo with logprobs"),
        (lambda: protocol.completion_requests(completion(prompt=[]), "c", MAX_LEN), "1 to 128 prompts"),
        (lambda: protocol.completion_requests(completion(logit_bias={"-4": 1}), "c", MAX_LEN), "logit_bias"),
    ],
)
def test_requests_the_server_cannot_honour_are_bad_requests(make, message):
    with pytest.raises(InvalidRequestError, match=message):
        make()


def test_wrong_types_fail_validation():
    with pytest.raises(ValidationError, match="logit_bias"):
        completion(logit_bias={"not-a-token": 1})


def test_unknown_fields_are_ignored_with_one_warning_per_name(caplog):
    protocol._warned.discard("frobnicate")
    protocol._warned.discard("stream_options.later")
    body = completion(frobnicate=1, stream_options={"include_usage": True, "later": 2})
    with caplog.at_level("WARNING", logger="pdserve.router"):
        protocol.screen(body)
        protocol.screen(completion(frobnicate=2))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "'frobnicate'" in warned[0] and "'stream_options.later'" in warned[1]
    (msg,) = protocol.completion_requests(body, "c", MAX_LEN)
    assert msg.text == "hi"


@pytest.mark.parametrize("field, value", [("use_beam_search", True), ("best_of", 3),
                                          ("add_generation_prompt", False), ("chat_template", "{{x}}"),
                                          ("logits_processors", ["a.b"])])
def test_refused_fields_in_use_are_bad_requests_naming_the_field(field, value):
    with pytest.raises(InvalidRequestError, match=f"^{field}=.* is not supported"):
        protocol.screen(chat(**{field: value}))


@pytest.mark.parametrize("field, value", [("use_beam_search", False), ("best_of", 1),
                                          ("add_generation_prompt", True), ("length_penalty", 1.0)])
def test_refused_fields_at_their_neutral_value_pass(field, value):
    protocol.screen(chat(**{field: value}))


def test_vllm_sampling_extras_reach_the_wire():
    body = completion(allowed_token_ids=[5, 3], bad_words=["foo", "bar baz"], truncate_prompt_tokens=10,
                      guided_decoding_backend="xgrammar", spaces_between_special_tokens=False)
    protocol.screen(body)
    (msg,) = protocol.completion_requests(body, "c", MAX_LEN)
    assert (list(msg.sampling.allowed_token_ids), list(msg.sampling.bad_words)) == ([5, 3], ["foo", "bar baz"])
    assert msg.truncate_prompt_tokens == 10
    (msg,) = protocol.completion_requests(completion(truncate_prompt_tokens=-1), "c", MAX_LEN)
    assert msg.truncate_prompt_tokens == MAX_LEN - 1
    with pytest.raises(InvalidRequestError, match="truncate_prompt_tokens"):
        protocol.completion_requests(completion(truncate_prompt_tokens=MAX_LEN), "c", MAX_LEN)
    with pytest.raises(InvalidRequestError, match="allowed_token_ids"):
        protocol.completion_requests(completion(allowed_token_ids=[]), "c", MAX_LEN)


def test_a_lark_grammar_becomes_ebnf_and_an_ebnf_one_passes_untouched():
    lark = '?start: greeting " " name\ngreeting: "hi" | "hello"\nname: ["dr "] "who"  // a comment'
    (msg,) = protocol.completion_requests(completion(guided_grammar=lark), "c", MAX_LEN)
    assert msg.sampling.structured_output.grammar == ('root ::= greeting " " name\ngreeting ::= "hi" | "hello"\n'
                                                      'name ::= ( "dr " ) ? "who"')
    (msg,) = protocol.completion_requests(completion(guided_grammar='root ::= "a"'), "c", MAX_LEN)
    assert msg.sampling.structured_output.grammar == 'root ::= "a"'
    with pytest.raises(InvalidRequestError, match="Lark form.*regex terminals"):
        protocol.completion_requests(completion(guided_grammar="start: /[a-z]+/"), "c", MAX_LEN)


def test_chat_echo_repeats_the_assistants_last_message_only():
    assistant = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once upon"}]
    assert protocol.chat_echo(chat(messages=assistant, echo=True)) == "Once upon"
    assert protocol.chat_echo(chat(echo=True)) is None
    assert protocol.chat_echo(chat(messages=assistant)) is None


# ---- responses ---------------------------------------------------------------------------------


def position(*entries: tuple[int, float, int]) -> common_pb2.PositionLogprobs:
    return common_pb2.PositionLogprobs(entries=[common_pb2.TokenLogprob(token_id=t, logprob=lp, rank=r)
                                                for t, lp, r in entries])


def fmt(kind: str, top: int | None = None, echo=None) -> ResponseFormat:
    return ResponseFormat(kind, "id-1", "m", lambda t: f"<{t}>", top, stop_token_ids=[9], echo=echo)


def test_chat_logprobs_give_the_sampled_token_and_exactly_top_n_alternatives_by_rank():
    f = fmt("chat", top=2)
    state = ChoiceState(0)
    # Sampled token 5 ranks third; the top two are 1 and 2; float32 values are exact halves.
    delta = common_pb2.CompletionDelta(index=0, token_ids=[5], text="x",
                                       logprobs=[position((5, -2.5, 3), (2, -1.5, 2), (1, -0.5, 1))])
    f.apply(state, delta)
    choice = f.delta_choice(state, delta, n=1)
    assert choice["logprobs"] == {"content": [{
        "token": "<5>", "logprob": -2.5, "bytes": list(b"<5>"),
        "top_logprobs": [{"token": "<1>", "logprob": -0.5, "bytes": list(b"<1>")},
                         {"token": "<2>", "logprob": -1.5, "bytes": list(b"<2>")}]}]}
    assert choice["delta"] == {"content": "x"} and choice["finish_reason"] is None


def test_completion_logprobs_carry_text_offsets_across_chunks_and_echo_comes_first():
    f = fmt("completion", top=0, echo=["P: "])
    state = ChoiceState(0)
    first = common_pb2.CompletionDelta(index=0, token_ids=[3, 4], text="ab", logprobs=[position((3, -1.0, 1)),
                                                                                       position((4, -2.0, 1))])
    last = common_pb2.CompletionDelta(index=0, token_ids=[9], text="", finish_reason="stop", stop_reason="9",
                                      logprobs=[position((9, -3.0, 1))])
    f.apply(state, first)
    one = f.delta_choice(state, first, n=1)
    f.apply(state, last)
    two = f.delta_choice(state, last, n=1)
    assert one["text"] == "P: ab" and one["logprobs"]["text_offset"] == [0, 3]
    assert two["logprobs"] == {"tokens": ["<9>"], "token_logprobs": [-3.0], "top_logprobs": [{"<9>": -3.0}],
                               "text_offset": [6]}
    assert (two["finish_reason"], two["stop_reason"]) == ("stop", 9)  # a stop token id stays a number


def test_a_whole_response_orders_choices_and_sums_usage():
    f = fmt("chat")
    usage = Usage()
    usage.add(common_pb2.Usage(prompt_tokens=10, completion_tokens=4, cached_tokens=8))
    body = f.response([ChoiceState(0, text="hi", finish_reason="length")], usage, n=1)
    assert body["object"] == "chat.completion" and body["id"] == "id-1"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None,
                                "finish_reason": "length", "stop_reason": None}]
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14,
                             "prompt_tokens_details": {"cached_tokens": 8}}


def test_a_delta_with_nothing_to_show_sends_no_chunk():
    f = fmt("chat")
    delta = common_pb2.CompletionDelta(index=0, token_ids=[1], text="")  # text held back (stop strings, UTF-8)
    assert f.delta_choice(ChoiceState(0), delta, n=1) is None


def test_errors_take_openais_shape_and_name_the_field():
    assert error_body(InvalidRequestError("temperature must be >= 0, got -1.0"))["error"] == {
        "message": "temperature must be >= 0, got -1.0", "type": "invalid_request_error", "param": "temperature",
        "code": "invalid_argument"}
    assert error_body(NotFoundError("model 'x' is not served here"))["error"]["type"] == "not_found_error"


# ---- merging streams ------------------------------------------------------------------------------


async def numbers(items, fail_at=None, delay=0.0):
    for i, item in enumerate(items):
        if i == fail_at:
            raise InvalidRequestError("boom")
        await asyncio.sleep(delay)
        yield item


def test_merge_tags_items_with_their_stream_and_keeps_each_streams_order():
    async def run():
        return [x async for x in merge([numbers([1, 2, 3], delay=0.001), numbers([10, 20], delay=0.0015)])]

    got = asyncio.run(run())
    assert sorted(got) == [(0, 1), (0, 2), (0, 3), (1, 10), (1, 20)]
    assert [v for i, v in got if i == 0] == [1, 2, 3] and [v for i, v in got if i == 1] == [10, 20]


def test_merge_raises_the_first_error_and_cancels_the_other_streams():
    finished = []

    async def slow():
        try:
            await asyncio.sleep(10)
            yield 1
        finally:
            finished.append("slow closed")

    async def run():
        with pytest.raises(InvalidRequestError, match="boom"):
            async for _ in merge([numbers([1, 2], fail_at=1), slow()]):
                pass
        await asyncio.sleep(0.01)

    asyncio.run(run())
    assert finished == ["slow closed"]
