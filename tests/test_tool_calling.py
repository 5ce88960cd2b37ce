"""Tool calling (issue #27): the parsers, the router's plan of a request's tools, the default
model's chat template, and the official `openai` client (and gRPC) against one live stack with
`--enable-auto-tool-choice --tool-call-parser hermes --chat-template <the default model's>`.

The stack runs a tiny dummy model (the default model's vocabulary), which calls no tool on its
own: `auto` is driven end to end by a guided_regex that makes it write Hermes markup, which the
parser must turn into calls. `required` and named calls are forced by the schema the router
builds, and must validate on every sample.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
from typing import Literal

import grpc
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from router import tool_calls
from router.main import DEFAULT_MODEL_CHAT_TEMPLATE
from router.tool_calls import ToolConfig
from router.tool_parsers import AUTO_PARSERS, collect, make_parser, parse
from router.openai_format import ChoiceState, ResponseFormat, TokenStrings, Usage
from services.cli.serve import TOOL_CALL_PARSERS, check_chat_args, router_argv
from services.cli.stack import LocalStack
from services.engine.errors import InvalidRequestError
from tests.test_services import wait_all_free

MODEL = "tiny-llama"


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=20)
    unit: Literal["celsius", "fahrenheit"]


class Time(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timezone: str = Field(max_length=12)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                            "parameters": Weather.model_json_schema()}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                         "parameters": Time.model_json_schema()}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {"get_weather": Weather, "get_time": Time}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def fragments(kind: str, text: str, size: int, function: str | None = None):
    """The parser's result when `text` arrives `size` characters at a time."""
    parser = make_parser(kind, function)
    events = []
    for i in range(0, len(text), size):
        events += parser.feed(text[i:i + size])
    events += parser.finish()
    content, calls = collect(events)
    return content, [(c.name, c.arguments) for c in calls], parser.broken


# ---- parsers ----------------------------------------------------------------------------------------

HERMES = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "x": [1, {"y": "}"}]}}\n'
          '</tool_call>\n<tool_call>{"arguments": {"timezone": "CET"}, "name": "get_time"}</tool_call>')
HERMES_CALLS = [("get_weather", '{"city": "Paris", "x": [1, {"y": "}"}]}'), ("get_time", '{"timezone": "CET"}')]


def test_hermes_reads_every_call_and_the_text_around_them():
    content, calls = parse(make_parser("hermes"), HERMES)
    assert content == "Let me look."
    assert [(c.name, c.arguments) for c in calls] == HERMES_CALLS
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


@pytest.mark.parametrize("size", [1, 2, 3, 5, 11])
def test_hermes_in_fragments_gives_what_the_whole_text_gives(size):
    content, calls, broken = fragments("hermes", HERMES, size)
    assert (content, calls, broken) == ("Let me look.\n\n", HERMES_CALLS, False)


@pytest.mark.parametrize("text", [
    "<tool_call>not json</tool_call> then text",
    '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>',  # the object never closes
    '<tool_call>{"arguments": {"a": 1}}</tool_call>',  # no name
    '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "f", "argu',  # cut off
    '<tool_call>{"na\\qme": "f", "arguments": {}}</tool_call>',  # bad escapes: in a key,
    '<tool_call>{"name": "f\\q", "arguments": {}}</tool_call>',  # in the name,
    '<tool_call>{"name": "f", "arguments": "{\\q}"}</tool_call>',  # in arguments sent as a string
    '<tool_call>{"name": "f\n", "arguments": {}}</tool_call>',  # a raw newline in a string
])
def test_malformed_hermes_markup_is_plain_content(text):
    assert parse(make_parser("hermes"), text) == (text, [])


@pytest.mark.parametrize("text", ["<tool_call>not json</tool_call> then", "a <tool_ call b <tool", "<tool_call>{"])
def test_streamed_malformed_hermes_markup_comes_out_as_the_same_text(text):
    for size in (1, 4):
        content, calls, _ = fragments("hermes", text, size)
        assert (content, calls) == (text, [])


def test_random_calls_and_text_in_random_fragments_parse_as_the_whole_text_does():
    rng = random.Random(1)

    def value(depth=0):
        if depth > 2 or rng.random() < 0.3:
            return rng.choice([1, -2.5, 'x"}{\\n', True, None, "é😀", "</tool_call>"])
        if rng.random() < 0.5:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(["a", "b}", 'c"', "name"]): value(depth + 1) for _ in range(rng.randint(0, 3))}

    for _ in range(300):
        calls = [(rng.choice(["f", "g_1", "h.x"]), {k: value() for k in rng.sample("pqr", rng.randint(0, 2))})
                 for _ in range(rng.randint(0, 3))]
        text = ""
        for name, args in calls:
            space = rng.choice(["", " ", "\n"])
            body = json.dumps({"name": name, "arguments": args}, ensure_ascii=rng.random() < 0.5,
                              separators=rng.choice([(",", ":"), (", ", ": ")]))
            text += rng.choice(["", "text ", "a < b ", "\n"]) + f"<tool_call>{space}{body}{space}</tool_call>"
        text += rng.choice(["", " bye", " <tool"])
        content, whole = parse(make_parser("hermes"), text)
        assert [(c.name, json.loads(c.arguments)) for c in whole] == calls
        size = rng.randint(1, 8)
        streamed_content, streamed_calls, broken = fragments("hermes", text, size)
        assert not broken and streamed_calls == [(c.name, c.arguments) for c in whole]
        assert streamed_content.strip() == (content or "") if calls else streamed_content == content == text


def test_text_without_markup_is_content_and_a_partial_tag_is_held_back_until_it_is_not_one():
    parser = make_parser("hermes")
    assert collect(parser.feed("5 < 6 and <tool"))[0] == "5 < 6 and "
    assert collect(parser.feed("kit") + parser.finish())[0] == "<toolkit"
    assert not parser.broken


LLAMA = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "get_time", "parameters": {}}'


@pytest.mark.parametrize("size", [1, 4, len(LLAMA)])
def test_llama3_json_reads_calls_whole_or_in_fragments(size):
    assert fragments("llama3_json", LLAMA, size) == ("", [("get_weather", '{"city": "Rome"}'), ("get_time", "{}")],
                                                     False)


@pytest.mark.parametrize("text", ["The answer is {\"name\": 1}", '{"name": "f", "parameters": oops}', '{"name": "f"'])
def test_llama3_json_output_that_is_not_calls_is_content(text):
    assert parse(make_parser("llama3_json"), text) == (text, [])
    assert fragments("llama3_json", text, 3)[:2] == (text, [])


def test_required_and_named_outputs_parse_into_calls():
    required = '[{"name":"get_weather","parameters":{"city":"Oslo","unit":"celsius"}},{"name":"get_time","parameters":{"timezone":"UTC"}}]'
    assert fragments("required", required, 2)[1] == [("get_weather", '{"city":"Oslo","unit":"celsius"}'),
                                                     ("get_time", '{"timezone":"UTC"}')]
    assert fragments("named", '{"timezone":"UTC"}', 3, "get_time") == ("", [("get_time", '{"timezone":"UTC"}')], False)


def test_the_cli_knows_the_routers_parsers():
    assert TOOL_CALL_PARSERS == AUTO_PARSERS
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        ToolConfig(True, "mistral")


def test_an_unknown_parser_name_stops_start_up():
    from services.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--enable-auto-tool-choice", "--tool-call-parser", "mistral"])


def test_streamed_tool_chunks_carry_each_tokens_logprobs_once_and_the_finish_last():
    plan = tool_calls.plan(chat_with(TOOLS), AUTO)
    f = ResponseFormat("chat", "id", "m", TokenStrings(None), 0, [])
    f.tools = plan
    state = ChoiceState(0)

    def delta(text, token, **kw):
        position = common_pb2.PositionLogprobs(entries=[common_pb2.TokenLogprob(token_id=token, logprob=-1.0, rank=1)])
        return common_pb2.CompletionDelta(text=text, token_ids=[token], logprobs=[position], **kw)

    texts = ["Hi <tool", '_call>{"name": "get_time", "arguments": {"tim', 'ezone": "UTC"}}</tool_call>']
    chunks = []
    for i, text in enumerate(texts):
        last = i == len(texts) - 1
        event = f.delta_event(state, delta(text, i, **({"finish_reason": "stop"} if last else {})), 1, False)
        chunks += [json.loads(e) for e in event.removeprefix("data: ").split("\n\ndata: ") if e.strip()]
    choices = [c["choices"][0] for c in chunks]
    assert [len(c["logprobs"]["content"]) for c in choices if c["logprobs"]] == [1, 1, 1]
    assert choices[0]["delta"] == {"content": "Hi "}
    assert choices[1]["delta"]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": ""}
    arguments = "".join(c["delta"]["tool_calls"][0]["function"]["arguments"] for c in choices[2:-1])
    assert arguments == '{"timezone": "UTC"}'
    assert (choices[-1]["delta"], choices[-1]["finish_reason"]) == ({}, "tool_calls")
    assert all(c["finish_reason"] is None for c in choices[:-1])
    whole = f.response([ChoiceState(0, text="".join(texts), finish_reason="stop")], Usage(), 1)["choices"][0]
    assert whole["message"]["content"] == "Hi" and whole["finish_reason"] == "tool_calls"
    assert [c["function"] for c in whole["message"]["tool_calls"]] == [{"name": "get_time", "arguments": arguments}]


def test_chat_flags_are_checked_at_start_up_and_reach_the_router(tmp_path):
    from services.cli.main import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit, match="needs --tool-call-parser"):
        check_chat_args(parser.parse_args(["serve", "--enable-auto-tool-choice"]))
    with pytest.raises(SystemExit, match="is not a file"):
        check_chat_args(parser.parse_args(["router", "--chat-template", str(tmp_path / "missing.jinja")]))
    args = parser.parse_args(["serve", "--enable-auto-tool-choice", "--tool-call-parser", "llama3_json",
                              "--chat-template", str(DEFAULT_MODEL_CHAT_TEMPLATE)])
    check_chat_args(args)
    argv = router_argv(args)  # `pdserve serve` hands them to its router
    assert argv[argv.index("--tool-call-parser") + 1] == "llama3_json" and "--enable-auto-tool-choice" in argv
    assert argv[argv.index("--chat-template") + 1] == str(DEFAULT_MODEL_CHAT_TEMPLATE)


# ---- the router's plan ------------------------------------------------------------------------------


def chat_with(tools=(), **kw) -> router_pb2.ChatMessages:
    chat = router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(role="user", content="hi")], **kw)
    for t in tools:
        f = t["function"]
        chat.tools.add(name=f["name"], description=f.get("description", ""), parameters=json.dumps(f["parameters"]))
    return chat


AUTO = ToolConfig(True, "hermes")


@pytest.mark.parametrize("chat, config, message", [
    (chat_with(tool_choice=router_pb2.ToolChoice(mode="required")), AUTO, "tool_choice needs tools"),
    (chat_with(tool_choice=router_pb2.ToolChoice(function="f")), AUTO, "tool_choice needs tools"),
    (chat_with(TOOLS), ToolConfig(), "requires --enable-auto-tool-choice"),
    (chat_with(TOOLS, tool_choice=router_pb2.ToolChoice(mode="sometimes")), AUTO, "tool_choice must be"),
    (chat_with(TOOLS, tool_choice=router_pb2.ToolChoice(function="get_stock")), AUTO, "not among the tools"),
    (chat_with([WEATHER, WEATHER]), AUTO, "two tools are named"),
    (chat_with([{"function": {"name": "bad name", "parameters": {}}}]), AUTO, "function names"),
])
def test_bad_tool_requests_are_refused(chat, config, message):
    with pytest.raises(InvalidRequestError, match=message):
        tool_calls.plan(chat, config)


def test_tool_choice_none_without_tools_is_plain_chat_and_with_tools_renders_them_unparsed():
    assert tool_calls.plan(chat_with(tool_choice=router_pb2.ToolChoice(mode="none")), ToolConfig()) is None
    plan = tool_calls.plan(chat_with(TOOLS, tool_choice=router_pb2.ToolChoice(mode="none")), ToolConfig())
    assert (plan.mode, plan.parser(), plan.constraint) == ("none", None, None)
    assert [t["function"]["name"] for t in plan.tools] == ["get_weather", "get_time"]


def test_auto_with_parallel_tool_calls_false_returns_the_first_call_only():
    plan = tool_calls.plan(chat_with(TOOLS, parallel_tool_calls=False), AUTO)
    content, calls = parse(plan.parser(), HERMES)
    assert (content, [(c.name, c.arguments) for c in calls]) == ("Let me look.", HERMES_CALLS[:1])
    parser = plan.parser()
    events = [e for i in range(0, len(HERMES), 4) for e in parser.feed(HERMES[i:i + 4])] + parser.finish()
    assert [(c.name, c.arguments) for c in collect(events)[1]] == HERMES_CALLS[:1] and parser.calls == 1


def test_required_builds_an_array_schema_of_the_functions_and_named_the_functions_own():
    plan = tool_calls.plan(chat_with(TOOLS, tool_choice=router_pb2.ToolChoice(mode="required"),
                                     parallel_tool_calls=False), AUTO)
    schema = json.loads(plan.constraint.json_schema)
    assert (schema["type"], schema["minItems"], schema["maxItems"]) == ("array", 1, 1)
    assert [c["properties"]["name"]["enum"] for c in schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == Time.model_json_schema()
    named = tool_calls.plan(chat_with(TOOLS, tool_choice=router_pb2.ToolChoice(function="get_time")), AUTO)
    assert json.loads(named.constraint.json_schema) == Time.model_json_schema()
    assert (named.finish_reason("stop", True), plan.finish_reason("stop", True)) == ("stop", "tool_calls")


def test_a_multi_turn_chat_with_a_tool_result_renders_through_the_default_template(default_tokenizer):
    chat = chat_with(TOOLS)
    chat.messages.add(role="assistant", tool_calls=[common_pb2.ToolCall(id="call_1", name="get_weather",
                                                                        arguments='{"city": "Paris"}')])
    chat.messages.add(role="tool", tool_call_id="call_1", content='{"celsius": 21}')
    plan = tool_calls.plan(chat, AUTO)
    ids = default_tokenizer.apply_chat_template(tool_calls.template_messages(chat), plan.tools,
                                                DEFAULT_MODEL_CHAT_TEMPLATE.read_text())
    text = default_tokenizer.decode(ids, skip_special_tokens=False)
    assert '"name": "get_time"' in text and '"description": "The weather in a city now"' in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{"celsius": 21}\n</tool_response><|im_end|>\n'
            '<|im_start|>assistant\n') in text


def test_the_default_template_renders_a_chat_without_tools_as_the_models_own(default_tokenizer):
    for messages in (ASK, [{"role": "system", "content": "Be brief."}, *ASK]):
        assert default_tokenizer.apply_chat_template(messages, None, DEFAULT_MODEL_CHAT_TEMPLATE.read_text()) == \
            default_tokenizer.apply_chat_template(messages)


@pytest.fixture(scope="module")
def default_tokenizer():
    from services.engine import loader
    from services.engine.tokenizer import Tokenizer

    return Tokenizer.load(loader.resolve(None, weights=False).tokenizer_dir)


# ---- against a live stack ---------------------------------------------------------------------------

# Makes the model write Hermes markup with text before it, as a tool-calling model would.
HERMES_REGEX = (r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome|Oslo)", '
                r'"unit": "(celsius|fahrenheit)"\}\}\n</tool_call>')


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # Tool calling lives in the router: one decode worker (prefilling locally) on a tiny dummy
    # model with the default model's tokenizer, so --chat-template names the default's template.
    s = LocalStack(["--load-format", "dummy", "--preset", "tiny-llama", "--max-model-len", "1024", "--grace", "1",
                    "--kv-cache-memory", "64MiB"],
                   num_prefill=0, log_dir=tmp_path_factory.mktemp("tools"),
                   router_argv=["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--chat-template",
                                str(DEFAULT_MODEL_CHAT_TEMPLATE)])
    s.start(timeout=600)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{stack.http_port}/v1", api_key="unused", max_retries=0)


def chat(client, **kw):
    return client.chat.completions.create(**({"model": MODEL, "messages": ASK, "tools": TOOLS} | kw))


def streamed(client, **kw) -> dict[int, dict]:
    """Each choice of a stream, put back together: content, calls (id, name, argument
    fragments), finish reason."""
    choices: dict[int, dict] = {}
    for chunk in chat(client, stream=True, **kw):
        for c in chunk.choices:
            got = choices.setdefault(c.index, {"content": "", "calls": {}, "finish": None})
            got["content"] += c.delta.content or ""
            for t in c.delta.tool_calls or ():
                if t.index not in got["calls"]:  # a call opens with its id and name, before any argument
                    assert t.id.startswith("call_") and t.function.name and t.function.arguments == ""
                    got["calls"][t.index] = {"id": t.id, "name": t.function.name, "fragments": []}
                else:
                    assert t.id is None and t.function.name is None
                    got["calls"][t.index]["fragments"].append(t.function.arguments)
            got["finish"] = c.finish_reason or got["finish"]
    return choices


def concurrently(*calls):
    """Run the calls at once (their sequences share decode steps); their results in order."""
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def assert_valid_call(name: str, arguments: str) -> None:
    SCHEMAS[name].model_validate_json(arguments, strict=True)


@pytest.mark.slow
def test_auto_turns_the_models_markup_into_calls_whole_and_streamed(client, stack):
    kw = dict(tool_choice="auto", temperature=0, max_tokens=80, extra_body={"guided_regex": HERMES_REGEX})
    whole, got = concurrently(lambda: chat(client, **kw), lambda: streamed(client, **kw))
    whole = whole.choices[0]
    assert (whole.finish_reason, whole.message.content) == ("tool_calls", "Checking.")
    [call] = whole.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert_valid_call("get_weather", call.function.arguments)
    got = got[0]
    assert (got["finish"], got["content"]) == ("tool_calls", "Checking.\n")  # text around markup streams as content
    [streamed_call] = got["calls"].values()
    assert streamed_call["name"] == "get_weather" and len(streamed_call["fragments"]) > 2  # arguments stream
    assert "".join(streamed_call["fragments"]) == call.function.arguments
    wait_all_free(stack)


@pytest.mark.slow
def test_auto_without_a_call_and_none_answer_in_plain_text(client, stack):
    kw = dict(temperature=0, max_tokens=8)
    auto, none, auto_streamed, none_streamed, plain = concurrently(
        lambda: chat(client, **kw), lambda: chat(client, tool_choice="none", **kw), lambda: streamed(client, **kw),
        lambda: streamed(client, tool_choice="none", **kw),
        lambda: client.chat.completions.create(model=MODEL, messages=ASK, **kw))
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 100  # the tools are in the prompt
    auto, none = auto.choices[0], none.choices[0]
    for c in (auto, none):
        assert c.message.tool_calls is None and c.finish_reason in ("stop", "length")
    assert auto.message.content == none.message.content and auto.message.content
    assert auto_streamed[0] == {"content": auto.message.content, "calls": {}, "finish": auto.finish_reason}
    assert none_streamed[0]["content"] == none.message.content
    wait_all_free(stack)


@pytest.mark.slow
def test_required_and_named_calls_validate_on_every_sample_whole_and_streamed(client, stack):
    named = {"type": "function", "function": {"name": "get_weather"}}
    sampled = dict(temperature=1.0, seed=3)
    requests = [("required", dict(tool_choice="required", parallel_tool_calls=False, n=6, **sampled)),
                ("named", dict(tool_choice=named, n=6, **sampled)),
                ("required streamed", dict(tool_choice="required", parallel_tool_calls=False, n=2, **sampled)),
                ("named streamed", dict(tool_choice=named, n=2, **sampled)),
                # parallel calls allowed: a sampled model may chain calls past any max_tokens, so greedy
                ("required", dict(tool_choice="required", n=1, temperature=0))]
    results = concurrently(*(lambda r=r: (streamed if "streamed" in r[0] else chat)(client, max_tokens=60, **r[1])
                             for r in requests))
    samples = []
    for (kind, args), result in zip(requests, results, strict=True):
        finish = "stop" if kind.startswith("named") else "tool_calls"  # OpenAI's finish reasons
        if "streamed" in kind:
            choices = [(c["finish"], c["content"], [(t["name"], "".join(t["fragments"])) for t in c["calls"].values()])
                       for c in result.values()]
        else:
            choices = [(c.finish_reason, c.message.content or "", [(t.function.name, t.function.arguments)
                                                                   for t in c.message.tool_calls or ()])
                       for c in result.choices]
        assert len(choices) == args["n"]
        for reason, content, calls in choices:
            assert (reason, content) == (finish, ""), calls  # cut off by max_tokens counts as a failure
            assert len(calls) >= 1 and (len(calls) == 1 or args.get("parallel_tool_calls", True))
            for name, arguments in calls:
                assert name == "get_weather" or kind.startswith("required")
                assert_valid_call(name, arguments)
                samples.append(arguments)
    assert len(set(samples)) > 3  # really sampled, not one answer
    wait_all_free(stack)


@pytest.mark.slow
@pytest.mark.parametrize("kwargs, message", [
    (dict(tools=None, tool_choice="required"), "tool_choice needs tools"),
    (dict(tool_choice={"type": "function", "function": {"name": "get_stock"}}), "not among the tools"),
    (dict(tool_choice="required", response_format={"type": "json_object"}), "cannot be combined"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties":
                                                                                {"a": {"type": "nonsense"}}}}}],
          tool_choice="required"), "json schema"),
])
def test_bad_tool_requests_are_400s(client, stack, kwargs, message):
    with pytest.raises(openai.BadRequestError, match=message):
        chat(client, **({"max_tokens": 4} | kwargs))
    wait_all_free(stack)


@pytest.mark.slow
def test_a_conversation_with_a_tool_result_renders_and_runs(client, stack):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'}]
    got = chat(client, messages=messages, tool_choice="none", max_tokens=12, temperature=0)
    first = chat(client, max_tokens=1, tool_choice="none")
    assert got.choices[0].message.content and got.choices[0].finish_reason in ("stop", "length")
    assert got.usage.prompt_tokens > first.usage.prompt_tokens + 30  # the call and its result are in the prompt
    wait_all_free(stack)


@pytest.mark.slow
def test_grpc_chat_with_tools_returns_the_calls_on_the_finishing_delta(stack):
    def generate(choice: router_pb2.ToolChoice, **sampling) -> list[common_pb2.CompletionDelta]:
        chat = chat_with(TOOLS, tool_choice=choice)
        chat.messages[0].content = ASK[0]["content"]
        sampling = common_pb2.SamplingParams(max_tokens=80, temperature=0.8, **sampling)
        request = router_pb2.GenerateRequest(chat=chat, sampling=sampling)
        with grpc.insecure_channel(stack.router_address) as channel:
            responses = list(router_pb2_grpc.RouterStub(channel).Generate(request, timeout=120))
        return [d for r in responses for d in r.outputs]

    for choice, finish in ((router_pb2.ToolChoice(mode="required"), "tool_calls"),
                           (router_pb2.ToolChoice(function="get_time"), "stop")):
        deltas = generate(choice)
        *before, last = deltas
        assert last.finish_reason == finish and not any(d.tool_calls for d in before)
        assert len(last.tool_calls) >= 1 and all(c.id.startswith("call_") for c in last.tool_calls)
        for c in last.tool_calls:
            assert_valid_call(c.name, c.arguments)
        assert choice.function in ("", last.tool_calls[0].name)
    # auto: the text streams with its markup; the finishing delta has the parsed call.
    deltas = generate(router_pb2.ToolChoice(mode="auto"),
                      structured_output=common_pb2.StructuredOutput(regex=HERMES_REGEX))
    assert "".join(d.text for d in deltas).startswith("Checking.\n<tool_call>\n{")
    assert deltas[-1].finish_reason == "tool_calls" and [c.name for c in deltas[-1].tool_calls] == ["get_weather"]
    assert_valid_call("get_weather", deltas[-1].tool_calls[0].arguments)
    with pytest.raises(grpc.RpcError) as err:
        generate(router_pb2.ToolChoice(function="get_stock"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    wait_all_free(stack)
