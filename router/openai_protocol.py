"""OpenAI API request bodies (pydantic models) and their translation into GenerateRequests.

Each prompt of a body becomes one router_pb2.GenerateRequest, so the HTTP front runs through
the same `RouterServicer.prepare` / `stream` as the gRPC Generate; value checks (ranges,
lengths) happen there, with the engine's semantics, not twice.

Beyond OpenAI's fields, vLLM's extras are accepted: top_k, min_p, repetition_penalty,
ignore_eos, min_tokens, stop_token_ids, skip_special_tokens, include_stop_str_in_output,
priority, cache_salt, and structured output as guided_json / guided_regex / guided_grammar /
guided_choice beside `response_format`; and pdserve's `speculative` (false: no speculative
decoding for this request). Unknown fields are an error, as at OpenAI.

max_tokens left unset means "until the context is full", as at OpenAI and in vLLM.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pdserve.v1 import common_pb2, router_pb2
from services.engine.errors import InvalidRequestError
from services.engine.sampling_params import MAX_N

MAX_PROMPTS = MAX_N  # prompts in one /v1/completions body

# Sampling fields whose names and meaning are the same in the body and in common.proto.
_SAME_NAME = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
              "frequency_penalty", "seed", "min_tokens", "ignore_eos", "skip_special_tokens",
              "include_stop_str_in_output", "cache_salt", "speculative")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(_Body):
    """What completions and chat completions share."""

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None  # OpenAI sends token ids as string keys
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, unused
    response_format: ResponseFormat | None = None
    # vLLM's extras.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    priority: int = Field(default=0, ge=-(2**31), lt=2**31)
    cache_salt: str | None = None
    speculative: bool | None = None  # pdserve's: false opts out of speculative decoding
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Clients send back what they received (tool_calls, refusal, ...): ignore what we do not use.
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted, unused without tools
    store: bool | None = None  # accepted, unused
    metadata: dict[str, str] | None = None  # accepted, unused

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- translation -------------------------------------------------------------------------------


def sampling_of(body: SamplingFields, max_model_len: int, logprobs: int | None) -> common_pb2.SamplingParams:
    """The body's sampling fields on the wire. Without max_tokens, generation may run to the
    end of the context (`max_model_len`; the engine stops there with finish_reason "length")."""
    max_tokens = body.requested_max_tokens if body.requested_max_tokens is not None else max_model_len
    msg = common_pb2.SamplingParams()
    for name in _SAME_NAME:
        value = getattr(body, name)
        if value is not None:
            try:
                setattr(msg, name, value)
            except ValueError as e:  # outside the wire type (a negative seed or n)
                raise InvalidRequestError(f"{name}={value} is out of range") from e
    msg.max_tokens = _uint(max_tokens, "max_tokens")
    if logprobs is not None:
        msg.logprobs = _uint(logprobs, "logprobs")
    if body.stop is not None:
        msg.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    msg.stop_token_ids.extend(_uint(t, "stop_token_ids") for t in body.stop_token_ids or ())
    for token, bias in (body.logit_bias or {}).items():
        msg.logit_bias[_uint(token, "logit_bias")] = bias
    constraint = structured_output_of(body)
    if constraint is not None:
        msg.structured_output.CopyFrom(constraint)
    return msg


def structured_output_of(body: SamplingFields) -> common_pb2.StructuredOutput | None:
    """At most one of response_format (json_object / json_schema) and the guided_* fields."""
    given: list[tuple[str, common_pb2.StructuredOutput]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        given.append(("response_format", common_pb2.StructuredOutput(json_object=True)))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise InvalidRequestError("response_format of type json_schema needs json_schema.schema")
        given.append(("response_format", common_pb2.StructuredOutput(json_schema=json.dumps(fmt.json_schema.schema_))))
    if body.guided_json is not None:
        schema = body.guided_json if isinstance(body.guided_json, str) else json.dumps(body.guided_json)
        given.append(("guided_json", common_pb2.StructuredOutput(json_schema=schema)))
    if body.guided_regex is not None:
        given.append(("guided_regex", common_pb2.StructuredOutput(regex=body.guided_regex)))
    if body.guided_grammar is not None:
        given.append(("guided_grammar", common_pb2.StructuredOutput(grammar=body.guided_grammar)))
    if body.guided_choice is not None:
        choices = common_pb2.Choices(choices=body.guided_choice)
        given.append(("guided_choice", common_pb2.StructuredOutput(choice=choices)))
    if len(given) > 1:
        raise InvalidRequestError(f"only one of {', '.join(name for name, _ in given)} may constrain the output")
    return given[0][1] if given else None


def completion_requests(body: CompletionRequest, request_id: str, max_model_len: int) -> list[router_pb2.GenerateRequest]:
    """One GenerateRequest per prompt of a /v1/completions body."""
    if body.suffix is not None:
        raise InvalidRequestError("suffix is not supported")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequestError("best_of other than n is not supported")
    if body.echo and body.logprobs is not None:
        raise InvalidRequestError("echo with logprobs is not supported (prompt logprobs are not computed)")
    prompts = _prompts(body.prompt)
    if not 0 < len(prompts) <= MAX_PROMPTS:
        raise InvalidRequestError(f"prompt must hold 1 to {MAX_PROMPTS} prompts, got {len(prompts)}")
    sampling = sampling_of(body, max_model_len, body.logprobs)
    requests = []
    for i, prompt in enumerate(prompts):
        rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
        msg = router_pb2.GenerateRequest(request_id=rid, sampling=sampling, priority=body.priority, model=body.model)
        if isinstance(prompt, str):
            msg.text = prompt
        else:
            msg.token_ids.ids.extend(_uint(t, "prompt") for t in prompt)
        requests.append(msg)
    return requests


def chat_request(body: ChatCompletionRequest, request_id: str, max_model_len: int) -> router_pb2.GenerateRequest:
    """The GenerateRequest of a /v1/chat/completions body (the router renders the chat template)."""
    if body.tools and body.tool_choice != "none":
        raise InvalidRequestError("tool calling is not supported by this server")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs=true")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    sampling = sampling_of(body, max_model_len, logprobs)
    chat = router_pb2.ChatMessages(messages=[_chat_message(m) for m in body.messages])
    return router_pb2.GenerateRequest(request_id=request_id, chat=chat, sampling=sampling, priority=body.priority,
                                      model=body.model)


def _chat_message(m: ChatMessage) -> router_pb2.ChatMessage:
    content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content or ())
    # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
    return router_pb2.ChatMessage(role="system" if m.role == "developer" else m.role, content=content)


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]  # one prompt of token ids
    return list(prompt)


def _uint(value: int, field: str) -> int:
    if not 0 <= value < 2**32:
        raise InvalidRequestError(f"{field} must hold non-negative 32-bit integers, got {value}")
    return value
