"""OpenAI API request bodies (pydantic models) and their translation into GenerateRequests.

Each prompt of a body becomes one router_pb2.GenerateRequest, so the HTTP front runs through
the same `RouterServicer.prepare` / `stream` as the gRPC Generate; value checks (ranges,
lengths) happen there, with the engine's semantics, not twice.

Beyond OpenAI's fields, vLLM's extras are accepted: top_k, min_p, repetition_penalty,
ignore_eos, min_tokens, stop_token_ids, allowed_token_ids, bad_words, skip_special_tokens,
spaces_between_special_tokens, include_stop_str_in_output, truncate_prompt_tokens,
prompt_logprobs, priority, cache_salt, chat `echo`, and structured output as guided_json / guided_regex / guided_grammar
(EBNF, or Lark rewritten into it) / guided_choice beside `response_format`; and pdserve's
`speculative` (false: no speculative decoding for this request).

Chat tool calling (`tools`, `tool_choice`, `parallel_tool_calls`, and assistant `tool_calls` /
`tool` messages sent back) travels on the ChatMessages; router/tool_calls.py checks and plans it.

Field policy (vLLM's): a field this server does not know is accepted and ignored, with a
warning logged once per field name, except those in REFUSED, whose silent loss would change
the answer: they are a 400 naming the field. (gRPC stays strict: its clients are generated.)

max_tokens left unset: 16 for completions (OpenAI's and vLLM's default, clamped to the
context), "until the context is full" for chat completions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from pdserve.v1 import common_pb2, router_pb2
from router.lark_grammar import is_lark, lark_to_ebnf
from services.engine.errors import InvalidRequestError
from services.engine.sampling_params import MAX_N

log = logging.getLogger("pdserve.router")

MAX_PROMPTS = MAX_N  # prompts in one /v1/completions body
COMPLETION_MAX_TOKENS = 16  # /v1/completions without max_tokens, as at OpenAI and in vLLM

# Sampling fields whose names and meaning are the same in the body and in common.proto.
_SAME_NAME = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
              "frequency_penalty", "seed", "min_tokens", "ignore_eos", "skip_special_tokens",
              "include_stop_str_in_output", "cache_salt", "prompt_logprobs", "speculative")

# Fields this server does not implement whose loss would change the answer: field -> (is it
# in use?, why it is refused). Anything else unknown is ignored with a warning.
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "use_beam_search": (bool, "beam search is not supported"),
    "best_of": (lambda v: v not in (None, 1), "best_of other than n is not supported"),
    "length_penalty": (lambda v: v not in (None, 1, 1.0),
                       "length_penalty applies to beam search, which is not supported"),
    "logits_processors": (bool, "custom logits processors are not supported"),
    "return_tokens_as_token_ids": (bool, "tokens are returned as text"),
    "add_special_tokens": (lambda v: v is not None and v is not True, "the prompt is tokenized with special tokens"),
    "add_generation_prompt": (lambda v: v is False, "the chat template always adds the generation prompt"),
    "continue_final_message": (bool, "continuing the final message is not supported"),
    "chat_template": (lambda v: v is not None, "a per-request chat template is not supported"),
    "chat_template_kwargs": (bool, "chat template arguments are not supported"),
    "documents": (bool, "documents for the chat template are not supported"),
    "guided_whitespace_pattern": (lambda v: v is not None, "a JSON whitespace pattern is not supported"),
    "structural_tag": (lambda v: v is not None, "structural tags are not supported"),
    "structured_outputs": (bool, "use guided_json / guided_regex / guided_grammar / guided_choice or response_format"),
    "functions": (bool, "the legacy functions field is not supported"),
    "function_call": (lambda v: v is not None, "the legacy function_call field is not supported"),
    "modalities": (lambda v: v is not None and list(v) != ["text"], "only text output is supported"),
    "audio": (lambda v: v is not None, "audio output is not supported"),
}
# guided_decoding_backend values served as asked: xgrammar serves every constraint here.
_BACKENDS = {"auto", "xgrammar"}
_warned: set[str] = set()


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields: screen() refuses or ignores them


class StreamOptions(RequestBody):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # usage (so far) on every chunk


class JsonSchemaFormat(RequestBody):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(RequestBody):
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
    guided_decoding_backend: str | None = None  # accepted; xgrammar serves every constraint
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # No effect: the tokenizers this server loads are fast ones, which (in vLLM too) join
    # special tokens without spaces either way.
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # -1: to the context
    # Top-N logprobs of every prompt token (non-streamed responses).
    prompt_logprobs: int | None = None

    default_max_tokens: ClassVar[int | None] = None  # None: until the context is full

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """As in vLLM, continuous_usage_stats takes effect with include_usage."""
        return self.include_usage and self.stream_options.continuous_usage_stats

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    default_max_tokens: ClassVar[int | None] = COMPLETION_MAX_TOKENS


class TextPart(RequestBody):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str


class MessageToolCall(BaseModel):
    """A call an assistant message made, as clients send it back."""

    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    # Clients send back what they received (tool_calls, refusal, ...): ignore what we do not use.
    model_config = ConfigDict(extra="ignore")  # silently: screen() does not look inside messages
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool


class FunctionDefinition(RequestBody):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # accepted: required and named calls are always held to the schema


class Tool(RequestBody):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestBody):
    name: str


class NamedToolChoice(RequestBody):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None  # accepted, unused
    metadata: dict[str, str] | None = None  # accepted, unused
    echo: bool = False  # the reply starts with the last message's content, if it is the assistant's

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- the field policy ----------------------------------------------------------------------------


def screen(body: BaseModel) -> None:
    """Refuse a REFUSED field in use (400 naming it); log, once per name, the unknown ones ignored."""
    for name, value in unknown_fields(body):
        refused = REFUSED.get(name.rsplit(".", 1)[-1])
        if refused is not None and refused[0](value):
            raise InvalidRequestError(f"{name}={json.dumps(value)[:80]} is not supported: {refused[1]}")
        if refused is None and name not in _warned:
            _warned.add(name)
            log.warning("request field %r is not known to this server: ignored (logged once per field name)", name)
    backend = getattr(body, "guided_decoding_backend", None)
    if backend is not None and backend.split(":")[0] not in _BACKENDS and "guided_decoding_backend" not in _warned:
        _warned.add("guided_decoding_backend")
        log.warning("guided_decoding_backend=%r asked for: xgrammar serves every constraint here", backend)


def unknown_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, value) of every field the body's models do not declare."""
    for name, value in (model.model_extra or {}).items():
        yield prefix + name, value
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, RequestBody):
            yield from unknown_fields(value, f"{prefix}{name}.")


# ---- translation -------------------------------------------------------------------------------


def sampling_of(body: SamplingFields, max_model_len: int, logprobs: int | None) -> common_pb2.SamplingParams:
    """The body's sampling fields on the wire. Without max_tokens: the endpoint's default, or
    to the end of the context (`max_model_len`; the engine stops there with finish_reason
    "length"); the router clamps an unrequested max_tokens to the context (RouterServicer.prepare)."""
    max_tokens = body.requested_max_tokens
    if max_tokens is None:
        max_tokens = body.default_max_tokens or max_model_len
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
    msg.bad_words.extend(body.bad_words or ())
    if body.allowed_token_ids is not None:
        if not body.allowed_token_ids:
            raise InvalidRequestError("allowed_token_ids must list at least one token id")
        msg.allowed_token_ids.extend(_uint(t, "allowed_token_ids") for t in body.allowed_token_ids)
    for token, bias in (body.logit_bias or {}).items():
        msg.logit_bias[_uint(token, "logit_bias")] = bias
    if body.prompt_logprobs is not None and body.stream:
        raise InvalidRequestError("prompt_logprobs are returned in non-streamed responses only")
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
        grammar = lark_to_ebnf(body.guided_grammar) if is_lark(body.guided_grammar) else body.guided_grammar
        given.append(("guided_grammar", common_pb2.StructuredOutput(grammar=grammar)))
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
        _truncate(msg, body, max_model_len)
        if isinstance(prompt, str):
            msg.text = prompt
        else:
            msg.token_ids.ids.extend(_uint(t, "prompt") for t in prompt)
        requests.append(msg)
    return requests


def chat_request(body: ChatCompletionRequest, request_id: str, max_model_len: int) -> router_pb2.GenerateRequest:
    """The GenerateRequest of a /v1/chat/completions body (the router renders the chat template)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs=true")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    sampling = sampling_of(body, max_model_len, logprobs)
    chat = router_pb2.ChatMessages(messages=[chat_message(m) for m in body.messages])
    _tools(body, chat)
    msg = router_pb2.GenerateRequest(request_id=request_id, chat=chat, sampling=sampling, priority=body.priority,
                                     model=body.model)
    _truncate(msg, body, max_model_len)
    return msg


def chat_echo(body: ChatCompletionRequest) -> str | None:
    """With echo, the text the reply starts with: the last message's, if it is the assistant's (vLLM's rule)."""
    if not body.echo or not body.messages or body.messages[-1].role != "assistant":
        return None
    return chat_message(body.messages[-1]).content


def _truncate(msg: router_pb2.GenerateRequest, body: SamplingFields, max_model_len: int) -> None:
    """truncate_prompt_tokens: keep the prompt's last N tokens; -1 keeps as many as leave one to generate."""
    if body.truncate_prompt_tokens is None:
        return
    keep = max_model_len - 1 if body.truncate_prompt_tokens == -1 else body.truncate_prompt_tokens
    if not 0 < keep < max_model_len:
        raise InvalidRequestError(f"truncate_prompt_tokens must be -1 or in [1, {max_model_len}), "
                                  f"got {body.truncate_prompt_tokens}")
    msg.truncate_prompt_tokens = keep


def chat_message(m: ChatMessage) -> router_pb2.ChatMessage:
    content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content or ())
    # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
    calls = [common_pb2.ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
             for c in m.tool_calls or ()]
    return router_pb2.ChatMessage(role="system" if m.role == "developer" else m.role, content=content,
                                  tool_calls=calls, tool_call_id=m.tool_call_id or "", name=m.name or "")


def _tools(body: ChatCompletionRequest, chat: router_pb2.ChatMessages) -> None:
    """tools, tool_choice and parallel_tool_calls onto the chat (the router checks them)."""
    for tool in body.tools or ():
        f = tool.function
        parameters = json.dumps(f.parameters) if f.parameters is not None else ""
        chat.tools.add(name=f.name, description=f.description or "", parameters=parameters)
    if isinstance(body.tool_choice, NamedToolChoice):
        chat.tool_choice.function = body.tool_choice.function.name
    elif body.tool_choice is not None:
        chat.tool_choice.mode = body.tool_choice
    if body.parallel_tool_calls is not None and body.tools:  # without tools, as at OpenAI: no effect
        chat.parallel_tool_calls = body.parallel_tool_calls


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
