"""The OpenAI-compatible API, driven by the official `openai` client against a live stack
(router + prefill + decode as real processes) on the default model, SmolLM2-135M-Instruct.

One stack for the module. The structured-output requests (n=20 at temperature 1.0 for each
schema) run concurrently so their sequences share decode steps.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import urllib.error
import urllib.request
from typing import Annotated, Literal

import grpc
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.cli.client import RemoteResult, make_request
from services.cli.stack import LocalStack
from services.engine import SamplingParams, StructuredOutputParams
from services.engine.errors import UpstreamError
from services.rpc.convert import params_to_proto
from tests.test_services import wait_all_free

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 1024
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # INFO: every process logs each request's id (test_a_clients_request_id_is_returned_and_logged_on_every_process).
    s = LocalStack(["--max-model-len", str(MAX_MODEL_LEN), "--grace", "1", "--kv-cache-memory", "512MiB"], log_dir=tmp_path_factory.mktemp("openai"),
                   log_level="INFO")
    s.start(timeout=600)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{stack.http_port}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def router(stack):
    channel = grpc.insecure_channel(stack.router_address)
    yield router_pb2_grpc.RouterStub(channel)
    channel.close()


def grpc_generate(router, request: router_pb2.GenerateRequest) -> RemoteResult:
    result = RemoteResult("")
    for response in router.Generate(request, timeout=120):
        result.add(response)
    return result


def grpc_text(router, prompt: str, params: SamplingParams, chat: bool = False) -> RemoteResult:
    return grpc_generate(router, make_request(prompt, params, chat))


def decode_blocks_received(stack) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.decodes[0].metrics_port}/metrics").read().decode()
    found = re.search(r'pdserve:kv_blocks_shipped_total\{[^}]*\bdirection="received"[^}]*\} ([\d.e+]+)', text)
    return int(float(found.group(1))) if found else 0


# ---- plain generation ------------------------------------------------------------------------------


def test_models_lists_the_served_model(client):
    assert [(m.id, m.owned_by) for m in client.models.list().data] == [(MODEL, "pdserve")]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")


@pytest.mark.parametrize("prompt", ["What is AI?", "def fibonacci(n):"])
def test_greedy_completion_equals_the_grpc_path(client, router, prompt):
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    expected = grpc_text(router, prompt, SamplingParams(temperature=0, max_tokens=16))
    assert got.choices[0].text == expected.completions[0].text and got.choices[0].text
    assert got.choices[0].finish_reason == expected.completions[0].finish_reason
    usage = got.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.usage.prompt_tokens, expected.usage.completion_tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_greedy_chat_equals_the_grpc_chat_path(client, router):
    got = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    expected = grpc_text(router, QUESTION[0]["content"], SamplingParams(temperature=0, max_tokens=24), chat=True)
    assert got.choices[0].message.content == expected.completions[0].text
    assert got.choices[0].message.role == "assistant" and "Paris" in got.choices[0].message.content
    assert got.usage.prompt_tokens == expected.usage.prompt_tokens
    assert got.usage.completion_tokens == expected.usage.completion_tokens


def test_cached_prompt_tokens_are_reported_as_the_grpc_path_reports_them(client, router):
    prompt = "Tell me a story about a lighthouse keeper and a storm at sea. " * 3
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)  # warm the caches
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    expected = grpc_text(router, prompt, SamplingParams(temperature=0, max_tokens=2))
    assert got.usage.prompt_tokens_details.cached_tokens == expected.usage.cached_tokens > 0


def test_streamed_chat_with_n_2_adds_up_to_the_whole_response(client):
    kw = dict(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0.9, seed=7, n=2)
    whole = client.chat.completions.create(**kw)
    texts, roles, finishes, usage = {0: "", 1: ""}, {}, {}, None
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            roles.setdefault(c.index, c.delta.role)
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert roles == {0: "assistant", 1: "assistant"}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_completion_equals_the_non_streamed_one(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0.8, seed=3)
    whole = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_a_batch_of_prompts_gives_n_choices_per_prompt_in_order(client):
    prompts = ["The capital of Italy is", "Water boils at"]
    got = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, n=2)
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0).choices[0].text
               for p in prompts]
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.text for c in got.choices] == [singles[0], singles[0], singles[1], singles[1]]
    streamed = {i: "" for i in range(4)}
    for chunk in client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, n=2,
                                           stream=True, echo=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == {i: prompts[i // 2] + singles[i // 2] for i in range(4)}


def test_the_same_seed_gives_the_same_text_and_another_seed_another(client):
    kw = dict(model=MODEL, prompt="My favourite animal is", max_tokens=20, temperature=1.0)
    a, b = (client.completions.create(**kw, seed=42).choices[0].text for _ in range(2))
    other = client.completions.create(**kw, seed=43).choices[0].text
    assert a == b and a != other


def test_n_2_sequences_are_indexed_sampled_independently_and_both_counted(client):
    got = client.completions.create(model=MODEL, prompt="A good name for a cat is", max_tokens=12, n=2,
                                    temperature=1.0, seed=5, logprobs=0)
    assert [c.index for c in got.choices] == [0, 1] and got.choices[0].text != got.choices[1].text
    assert got.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in got.choices)


def test_a_stop_string_truncates_the_text(client):
    kw = dict(model=MODEL, prompt="Count: one, two, three, four, five,", max_tokens=16, temperature=0)
    text = client.completions.create(**kw).choices[0].text
    stop = text[4:7]
    got = client.completions.create(**kw, stop=[stop]).choices[0]
    assert got.text == text[: text.index(stop)] and got.finish_reason == "stop" and got.stop_reason == stop


def test_completion_logprobs_are_the_grpc_paths(client, router):
    got = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=6, temperature=0, logprobs=2)
    expected = grpc_text(router, "The sky is", SamplingParams(temperature=0, max_tokens=6, logprobs=2))
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == got.choices[0].text
    for token_id, position, chosen, top in zip(expected.completions[0].token_ids, expected.completions[0].logprobs,
                                               lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen == pytest.approx(position[str(token_id)])
        assert max(top.values()) == pytest.approx(max(position.values())) and 2 <= len(top) <= 3
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_chat_logprobs_list_top_logprobs_in_rank_order(client):
    got = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert entry.logprob == values[0]  # greedy: the sampled token is the most likely one
        assert bytes(entry.bytes).decode() == entry.token


def test_logit_bias_forces_a_token_as_on_the_grpc_path(client, router):
    forced = 1000  # any token id
    got = client.completions.create(model=MODEL, prompt="The weather today is", max_tokens=3, temperature=0,
                                    logit_bias={str(forced): 100})
    expected = grpc_text(router, "The weather today is", SamplingParams(temperature=0, max_tokens=3,
                                                                         logit_bias={forced: 100}))
    assert expected.completions[0].token_ids == [forced] * 3
    assert got.choices[0].text == expected.completions[0].text


# ---- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(temperature=-1), openai.BadRequestError, "temperature must be finite and >= 0"),
        (dict(model="gpt-17"), openai.NotFoundError, "gpt-17"),
        (dict(prompt="hello " * 1100), openai.BadRequestError, "context is 1024 tokens"),
        (dict(max_tokens=2000), openai.BadRequestError, "lower max_tokens"),
        (dict(top_p=0), openai.BadRequestError, "top_p"),
        (dict(n=0), openai.BadRequestError, "n must be"),
        (dict(extra_body={"guided_regex": "[a-"}), openai.BadRequestError, "invalid regex"),
        (dict(extra_body={"guided_json": {"type": "frobnicate"}}), openai.BadRequestError, "invalid json schema"),
        (dict(extra_body={"guided_regex": "a", "guided_choice": ["a"]}), openai.BadRequestError, "only one of"),
        (dict(extra_body={"use_beam_search": True}), openai.BadRequestError, "use_beam_search=true is not supported"),
        (dict(extra_body={"allowed_token_ids": [99999999]}), openai.BadRequestError, "allowed_token_ids"),
        (dict(logit_bias={"99999999": 1}), openai.BadRequestError, "logit_bias"),
    ],
)
def test_bad_requests_raise_the_clients_typed_errors(client, stack, kwargs, error, message):
    with pytest.raises(error) as err:
        client.completions.create(**({"model": MODEL, "prompt": "hi", "max_tokens": 8} | kwargs))
    body = err.value.body
    assert message in body["message"] and body["type"] in ("invalid_request_error", "not_found_error")
    wait_all_free(stack)


def test_a_bad_stream_request_fails_before_any_event(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=-2, stream=True)


def test_errors_map_to_http_statuses():
    from router.openai_api import error_body

    assert error_body(UpstreamError("RESOURCE_EXHAUSTED", "decode is full"))["error"] == {
        "message": "decode is full", "type": "rate_limit_error", "param": None, "code": "resource_exhausted"}
    assert UpstreamError("RESOURCE_EXHAUSTED", "").http_status == 429
    assert UpstreamError("UNAVAILABLE", "").http_status == 503


# ---- cancellation -------------------------------------------------------------------------------------


def test_disconnecting_mid_stream_frees_every_block_on_both_workers(client, stack):
    prompt = "Write a long essay about the history of the printing press in Europe. " * 8  # remote prefill
    before = decode_blocks_received(stack)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=900, temperature=0, stream=True)
    received = 0
    for chunk in stream:
        received += 1
        if received == 3:
            break
    stream.close()
    assert decode_blocks_received(stack) > before  # the prompt's KV came from the prefill worker
    wait_all_free(stack, timeout=20)


def test_a_client_timing_out_on_a_non_streamed_request_frees_every_block(stack):
    impatient = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.http_port}/v1", api_key="unused",
                              max_retries=0, timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt="Tell me everything about rivers.", max_tokens=900,
                                     temperature=0, extra_body={"ignore_eos": True})
    wait_all_free(stack, timeout=20)


# ---- structured output ---------------------------------------------------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Address(Strict):
    city: str = Field(max_length=20)
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Person(Strict):  # a nested object, required fields
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    address: Address


class Order(Strict):  # arrays, an enum, an optional field
    items: list[Annotated[str, Field(max_length=16)]] = Field(min_length=1, max_length=3)
    quantities: list[Annotated[int, Field(ge=1, le=99)]] = Field(min_length=1, max_length=3)
    status: Literal["pending", "shipped", "delivered"]
    gift: bool = False


class Ticket(Strict):  # enums and a boolean
    priority: Literal["low", "medium", "high"]
    team: Literal["billing", "support", "sales"]
    title: str = Field(max_length=30)
    urgent: bool


class Item(Strict):
    name: str = Field(max_length=16)
    price_cents: int = Field(ge=1, le=100000)


class Order2(Strict):
    items: list[Item] = Field(min_length=1, max_length=2)
    status: Literal["pending", "shipped"]


SCHEMAS = [
    (Person, "Describe a fictional person as JSON."),
    (Order, "Write a shop order as JSON."),
    (Ticket, "File a support ticket about a login problem as JSON."),
]


def constrained_chat(client, schema: type[BaseModel], prompt: str) -> list[openai.types.chat.chat_completion.Choice]:
    response_format = {"type": "json_schema",
                       "json_schema": {"name": schema.__name__, "schema": schema.model_json_schema()}}
    got = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], n=20,
                                         temperature=1.0, seed=1, max_tokens=100, response_format=response_format)
    return got.choices


def test_twenty_sampled_completions_per_schema_all_validate(client):
    with concurrent.futures.ThreadPoolExecutor(len(SCHEMAS)) as pool:
        results = list(pool.map(lambda s: constrained_chat(client, *s), SCHEMAS))
    for (schema, _), choices in zip(SCHEMAS, results, strict=True):
        assert len(choices) == 20
        for c in choices:
            assert c.finish_reason == "stop", c.message.content  # cut off by max_tokens counts as a failure
            schema.model_validate_json(c.message.content, strict=True)
        assert len({c.message.content for c in choices}) > 10, schema  # really sampled, not one answer


def test_json_object_and_the_official_parse_helper(client):
    got = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Give a JSON object."}],
                                         temperature=0, max_tokens=60, response_format={"type": "json_object"})
    assert got.choices[0].finish_reason == "stop" and isinstance(json.loads(got.choices[0].message.content), dict)
    parsed = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "An order, as JSON."}],
                                           temperature=0, max_tokens=80, response_format=Order2)
    assert isinstance(parsed.choices[0].message.parsed, Order2)


def test_regex_and_choice_guided_completions_always_match(client):
    pattern = r"[A-Z]{3}-[0-9]{4}"
    got = client.completions.create(model=MODEL, prompt="A product code:", max_tokens=20, n=20, temperature=1.0,
                                    seed=4, extra_body={"guided_regex": pattern})
    assert all(re.fullmatch(pattern, c.text) and c.finish_reason == "stop" for c in got.choices)
    got = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10, n=6, temperature=1.0,
                                         extra_body={"guided_choice": ["Paris", "Lyon", "Nice"]})
    assert {c.message.content for c in got.choices} <= {"Paris", "Lyon", "Nice"}


def test_a_grammar_constrains_streamed_output(client):
    grammar = 'root ::= "Answer: " ("yes" | "no") "."'
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Is water wet?", max_tokens=10, stream=True, extra_body={"guided_grammar": grammar}))
    assert text in ("Answer: yes.", "Answer: no.")


def test_constrained_output_through_remote_prefill(client, router, stack):
    prompt = ("You are filing tickets for an IT helpdesk. Each ticket says who is affected, what broke and when. "
              "Today the VPN dropped for the whole finance floor right after the morning update. ") * 3
    messages = [{"role": "user", "content": prompt + "File the ticket as JSON."}]
    before = decode_blocks_received(stack)
    got = client.chat.completions.create(
        model=MODEL, messages=messages, n=4, temperature=1.0, seed=9, max_tokens=100,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": Ticket.model_json_schema()}})
    assert decode_blocks_received(stack) > before  # its prompt's KV came from the prefill worker
    for c in got.choices:
        assert c.finish_reason == "stop"
        Ticket.model_validate_json(c.message.content, strict=True)
    # The same options through gRPC Generate, with its disaggregation record.
    params = SamplingParams(n=2, temperature=1.0, seed=10, max_tokens=100,
                            structured_output=StructuredOutputParams(json_schema=Ticket.model_json_schema()))
    request = router_pb2.GenerateRequest(sampling=params_to_proto(params))
    other = ("Our printer on the third floor jams on every page since Monday; the whole design team is waiting "
             "for their proofs and the deadline is on Friday. ") * 3
    request.chat.messages.add(role="user", content=other + "File the ticket as JSON.")
    result = grpc_generate(router, request)
    assert result.disaggregation.remote_prefill and result.disaggregation.decode_computed_prompt_tokens == 0
    for c in result.completions.values():
        Ticket.model_validate_json(c.text, strict=True)
    wait_all_free(stack)


def test_an_invalid_schema_over_grpc_is_invalid_argument_before_any_work(router, stack):
    sampling = common_pb2.SamplingParams(structured_output=common_pb2.StructuredOutput(json_schema='{"type": 5}'))
    request = router_pb2.GenerateRequest(text="hi", sampling=sampling)
    with pytest.raises(grpc.RpcError) as err:
        grpc_generate(router, request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "invalid json schema" in err.value.details()
    wait_all_free(stack)



def test_the_default_model_makes_a_valid_required_call_through_its_shipped_tool_template(client, stack):
    """Tool calling on a server started without tool flags: required and named calls still work
    (structured output), auto is refused as vLLM refuses it. Details: tests/test_tool_calling.py."""
    tools = [{"type": "function", "function": {"name": "file_ticket", "description": "File a support ticket",
                                               "parameters": Ticket.model_json_schema()}}]
    messages = [{"role": "user", "content": "The login page rejects my password. Please file a ticket."}]
    got = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="required", n=2,
                                         temperature=1.0, seed=5, max_tokens=100, parallel_tool_calls=False)
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert got.usage.prompt_tokens > plain.usage.prompt_tokens + 100  # the default template shows the tools
    for c in got.choices:
        [call] = c.message.tool_calls
        assert (c.finish_reason, call.function.name) == ("tool_calls", "file_ticket")
        Ticket.model_validate_json(call.function.arguments, strict=True)
    with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice"):
        client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=4)
# ---- vLLM's request fields (issue #27) -------------------------------------------------------------


def http(stack, method: str, path: str, body: dict | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict, dict[str, str]]:
    """(status, JSON body, headers) of a plain HTTP call to the router."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{stack.http_port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null"), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), {k.lower(): v for k, v in e.headers.items()}


def token_ids(stack, text: str) -> list[int]:
    return http(stack, "POST", "/tokenize", {"prompt": text, "add_special_tokens": False})[1]["tokens"]


def test_an_unknown_field_is_ignored_and_the_answer_unchanged(client, stack):
    kw = dict(model=MODEL, prompt="What is AI?", max_tokens=8, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    ignored = client.completions.create(**kw, extra_body={"frobnicate": 1, "mm_processor_kwargs": {}})
    assert ignored.choices[0].text == plain
    wait_all_free(stack)


def test_completions_default_to_16_tokens(client, stack):
    got = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, extra_body={"ignore_eos": True})
    assert got.usage.completion_tokens == 16 and got.choices[0].finish_reason == "length"
    wait_all_free(stack)


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(client, stack):
    chunks = list(client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    usages = [c.usage for c in chunks]
    assert all(u is not None for u in usages)
    assert len({u.prompt_tokens for u in usages}) == 1
    completion = [u.completion_tokens for u in usages]
    assert completion == sorted(completion) and completion[-1] == 12
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == usages[0].prompt_tokens + 12
    wait_all_free(stack)


def test_allowed_token_ids_limit_every_generated_token(client, stack):
    allowed = token_ids(stack, " yes") + token_ids(stack, " no")
    got = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=6, temperature=1.0, seed=1,
                                    extra_body={"allowed_token_ids": allowed, "ignore_eos": True})
    assert re.fullmatch(r"( yes| no){6}", got.choices[0].text)
    wait_all_free(stack)


def test_a_bad_word_is_never_generated(client, stack):
    kw = dict(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    assert "Paris" in client.chat.completions.create(**kw).choices[0].message.content
    banned = client.chat.completions.create(**kw, extra_body={"bad_words": ["Paris"]}).choices[0].message.content
    assert banned and "Paris" not in banned
    wait_all_free(stack)


def test_chat_echo_starts_the_reply_with_the_assistants_last_message(client, stack):
    messages = [*QUESTION, {"role": "assistant", "content": "The capital"}]
    kw = dict(model=MODEL, messages=messages, max_tokens=4, temperature=0, extra_body={"echo": True})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                       if c.choices)
    assert whole.startswith("The capital") and len(whole) > len("The capital") and streamed == whole
    wait_all_free(stack)


def test_a_lark_grammar_and_guided_decoding_backend_constrain_the_output(client, stack):
    lark = '?start: answer\nanswer: "yes" | "no" | "maybe" [" not"]'
    got = client.completions.create(model=MODEL, prompt="Is the sky blue?", max_tokens=8, temperature=1.0, n=4, seed=2,
                                    extra_body={"guided_grammar": lark, "guided_decoding_backend": "xgrammar"})
    assert all(c.text in ("yes", "no", "maybe", "maybe not") for c in got.choices)
    with pytest.raises(openai.BadRequestError, match="Lark form.*regex terminals"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"guided_grammar": "start: /a+/"})
    wait_all_free(stack)


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(client, stack):
    got = client.completions.create(model=MODEL, prompt="hello " * 1100, max_tokens=2, temperature=0,
                                    extra_body={"truncate_prompt_tokens": 10})
    assert got.usage.prompt_tokens == 10
    wait_all_free(stack)


def test_include_stop_str_and_special_token_flags(client, stack):
    kw = dict(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[" 6"])
    cut = client.completions.create(**kw).choices[0].text
    kept = client.completions.create(**kw, extra_body={"include_stop_str_in_output": True,
                                                       "skip_special_tokens": False,
                                                       "spaces_between_special_tokens": False}).choices[0].text
    assert kept == cut + " 6"
    wait_all_free(stack)


# ---- request ids ---------------------------------------------------------------------------------


def test_a_clients_request_id_is_returned_and_logged_on_every_process(client, stack, router):
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="What is AI?", max_tokens=4,
                                                      extra_headers={"x-request-id": "trace-abc-123"})
    assert raw.headers["x-request-id"] == "trace-abc-123" and raw.parse().choices[0].text
    streamed = client.chat.completions.with_raw_response.create(model=MODEL, messages=QUESTION, max_tokens=2,
                                                                stream=True, extra_headers={"x-request-id": "trace-s"})
    assert streamed.headers["x-request-id"] == "trace-s"
    list(streamed.parse())
    responses = router.Generate(router_pb2.GenerateRequest(text="What is AI?", sampling=common_pb2.SamplingParams(
        max_tokens=2)), metadata=(("x-request-id", "trace-grpc"),), timeout=120)
    assert dict(responses.initial_metadata())["x-request-id"] == "trace-grpc"
    assert all(r.request_id == "trace-grpc" for r in responses)
    for child in (stack.router, stack.decodes[0]):
        assert re.search(r"trace-abc-123-[0-9a-f]{32}", child.log_path.read_text()), child.role
    http(stack, "POST", "/v1/completions", {"model": MODEL, "prompt": "Trace ids across workers. " * 20, "max_tokens": 2},
         {"x-request-id": "trace-remote"})  # long enough to prefill remotely
    assert re.search(r"trace-remote-[0-9a-f]{32}", stack.prefills[0].log_path.read_text())


def test_the_same_request_id_from_two_clients_gives_two_requests(client, stack):
    def run(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=1.0,
                                         seed=seed, extra_headers={"x-request-id": "same"}).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(run, [1, 2, 1, 2]))
    assert texts[0] == texts[2] != texts[1] == texts[3]
    status, body, _ = http(stack, "POST", "/v1/completions", {"model": MODEL, "prompt": "x"}, {"x-request-id": "a b"})
    assert status == 400 and "x-request-id" in body["error"]["message"]
    wait_all_free(stack)


# ---- vLLM's endpoints ----------------------------------------------------------------------------


def test_health_ping_and_version(stack):
    assert http(stack, "GET", "/health")[0] == 200
    assert http(stack, "GET", "/ping")[0] == 200 and http(stack, "POST", "/ping")[0] == 200
    status, body, _ = http(stack, "GET", "/version")
    assert status == 200 and re.match(r"\d+\.\d+", body["version"])


def test_tokenize_and_detokenize_round_trip(stack, router):
    status, body, _ = http(stack, "POST", "/tokenize", {"model": MODEL, "prompt": "What is AI?",
                                                        "return_token_strs": True})
    grpc_ids = list(router.Tokenize(router_pb2.TokenizeRequest(text="What is AI?"), timeout=30).token_ids)
    assert status == 200 and body["tokens"] == grpc_ids and body["count"] == len(grpc_ids)
    assert body["max_model_len"] == MAX_MODEL_LEN and len(body["token_strs"]) == len(grpc_ids)
    assert http(stack, "POST", "/detokenize", {"tokens": body["tokens"]})[1] == {"prompt": "What is AI?"}
    chat = http(stack, "POST", "/tokenize", {"messages": QUESTION})[1]
    assert chat["count"] > len(token_ids(stack, QUESTION[0]["content"]))  # the template's tokens too
    assert http(stack, "POST", "/detokenize", {"tokens": [10**9]})[0] == 400
    assert http(stack, "POST", "/tokenize", {"model": "gpt-17", "prompt": "x"})[0] == 404


def test_tokenizer_info_describes_the_tokenizer(stack):
    status, body, _ = http(stack, "GET", "/tokenizer_info")
    assert status == 200 and body["eos_token"] and body["chat_template"] and body["tokenizer_class"]


def test_embeddings_are_refused_naming_generative_models(client):
    with pytest.raises(openai.BadRequestError, match="serves generative models"):
        client.embeddings.create(model=MODEL, input="hi")


def test_invocations_route_by_body_shape(stack):
    status, chat, _ = http(stack, "POST", "/invocations", {"model": MODEL, "messages": QUESTION, "max_tokens": 4})
    assert status == 200 and chat["object"] == "chat.completion"
    status, completion, _ = http(stack, "POST", "/invocations", {"model": MODEL, "prompt": "Hi", "max_tokens": 4})
    assert status == 200 and completion["object"] == "text_completion"
    status, response, _ = http(stack, "POST", "/invocations", {"model": MODEL, "input": "Hi", "max_output_tokens": 4})
    assert status == 200 and response["object"] == "response"
    assert http(stack, "POST", "/invocations", {"model": MODEL})[0] == 400
    wait_all_free(stack)


# ---- the Responses API ---------------------------------------------------------------------------


def test_a_response_answers_like_the_chat_path(client, stack):
    got = client.responses.create(model=MODEL, input="What is the capital of France?", instructions="Be brief.",
                                  max_output_tokens=24, temperature=0)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."}, *QUESTION],
                                          max_tokens=24, temperature=0)
    assert got.output_text == chat.choices[0].message.content and got.output_text
    assert got.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert (got.usage.input_tokens, got.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    wait_all_free(stack)


def test_a_streamed_response_sends_the_events_in_order_and_adds_up(client, stack):
    kw = dict(model=MODEL, input=[{"role": "user", "content": "Tell me a story."}], max_output_tokens=16, temperature=0)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(**kw, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == 16
    wait_all_free(stack)


def test_what_a_response_cannot_honour_is_refused_naming_it(client):
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model=MODEL, input="and then?", previous_response_id="resp_123")
    with pytest.raises(openai.BadRequestError, match="text.format"):
        client.responses.create(model=MODEL, input="x", text={"format": {"type": "json_object"}})


# ---- metrics -------------------------------------------------------------------------------------

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def scrape(port: int) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return r.read().decode()


def test_every_process_keeps_pdserve_names_with_model_name_under_prometheus_accept_header(client, stack):
    client.completions.create(model=MODEL, prompt="What is AI?", max_tokens=4)
    for child in stack.children:
        text = scrape(child.metrics_port)
        samples = [line for line in text.splitlines() if line and not line.startswith("#")]
        ours = [line for line in samples if line.startswith("pdserve")]
        assert ours and all(line.startswith("pdserve:") for line in ours), child.role
        assert all(f'model_name="{MODEL}"' in line for line in ours), child.role
    decode = scrape(stack.decodes[0].metrics_port)
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_inference_time_seconds", "request_prompt_tokens", "request_generation_tokens",
                 "iteration_tokens_total"):
        assert re.search(rf"^pdserve:{name}_count{{[^}}]*}} [1-9]", decode, re.M), name
    assert re.search(r'^pdserve:cache_config_info\{[^}]*block_size="16"[^}]*\} 1\.0', decode, re.M)


# ---- prompt_logprobs -----------------------------------------------------------------------------


def test_prompt_logprobs_score_every_prompt_token_on_both_apis(client, router, stack):
    prompt = "The history of the printing press begins in Mainz, around the year 1450. " * 8
    ids = token_ids(stack, prompt)

    def scored() -> tuple[list[common_pb2.PositionLogprobs], bool]:
        request = router_pb2.GenerateRequest(text=prompt, sampling=common_pb2.SamplingParams(max_tokens=2,
                                                                                             prompt_logprobs=2))
        responses = list(router.Generate(request, timeout=120))
        with_them = [r for r in responses if r.prompt_logprobs]
        assert len(with_them) == 1 and len(with_them[0].prompt_logprobs) == len(ids)
        return list(with_them[0].prompt_logprobs), responses[-1].disaggregation

    remote, record = scored()  # a new prompt: prefilled remotely, its logprobs come with prefill's result
    assert record.remote_prefill and record.decode_computed_prompt_tokens == 0  # no fallback to local
    local, record = scored()  # decode now holds the prompt: prefilled there (reading no cached block)
    assert not record.remote_prefill and record.decode_computed_prompt_tokens == len(ids)
    assert not remote[0].entries and not local[0].entries
    for token, a, b in zip(ids[1:], remote[1:], local[1:], strict=True):
        (x,) = [e.logprob for e in a.entries if e.token_id == token]
        (y,) = [e.logprob for e in b.entries if e.token_id == token]
        assert x == pytest.approx(y, abs=1e-4)
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, n=2,
                                    extra_body={"prompt_logprobs": 1})
    for choice in got.choices:
        entries = choice.prompt_logprobs
        assert len(entries) == got.usage.prompt_tokens == len(ids) and entries[0] is None
        assert all(str(t) in e and e[str(t)]["rank"] >= 1 for t, e in zip(ids[1:], entries[1:], strict=True))
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, extra_body={"prompt_logprobs": 0})
    assert len(chat.prompt_logprobs) == chat.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="non-streamed"):
        client.completions.create(model=MODEL, prompt="x", stream=True, extra_body={"prompt_logprobs": 1})
    wait_all_free(stack)
