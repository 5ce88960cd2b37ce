"""Tool calling in the router: a chat request's tools and tool_choice -> what the chat
template receives, the constraint that forces a call, and the parser that reads calls back.

    tool_choice  output                                     read by
    none         text (the template still shows the tools)  -
    auto         text, maybe with calls in the model's      --tool-call-parser (needs
                 markup                                      --enable-auto-tool-choice, as in vLLM);
                                                             parallel_tool_calls=false: the first only
    required     constrained: [{"name", "parameters"}, ...]  the "required" parser
    named        constrained: the function's arguments      the "named" parser

required and named go through structured output (a JSON schema built from the functions'
parameters, compiled by the workers' xgrammar), so even a small model makes a valid call.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pdserve.v1 import common_pb2, router_pb2
from router.tool_parsers import AUTO_PARSERS, FirstCallOnly, ToolParser, make_parser, parse
from services.engine.errors import InvalidRequestError

_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolConfig:
    """The server's tool-calling flags (vLLM's): --enable-auto-tool-choice, --tool-call-parser."""

    auto: bool = False
    parser: str | None = None

    def __post_init__(self) -> None:
        if self.parser is not None and self.parser not in AUTO_PARSERS:
            raise ValueError(f"unknown tool-call parser {self.parser!r} (known: {', '.join(AUTO_PARSERS)})")
        if self.auto and self.parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")


@dataclass(frozen=True)
class ToolPlan:
    """One chat request's tool calling: `mode` is none, auto, required or named."""

    mode: str
    tools: list[dict[str, Any]]  # as chat templates take them (transformers' form)
    parser_kind: str | None  # a make_parser kind; None: the output is text only
    function: str | None = None  # named: the function
    constraint: common_pb2.StructuredOutput | None = None
    single: bool = False  # parallel_tool_calls=false

    def parser(self) -> ToolParser | None:
        """A fresh parser for one sequence's output."""
        if not self.parser_kind:
            return None
        parser = make_parser(self.parser_kind, self.function)
        return FirstCallOnly(parser) if self.single and self.mode == "auto" else parser

    def finish_reason(self, reason: str, called: bool) -> str:
        """As at OpenAI: "tool_calls" when auto made calls or required ended well; a named call
        ends with "stop"."""
        if (self.mode == "auto" and called) or (self.mode == "required" and reason == "stop"):
            return "tool_calls"
        return reason


def plan(chat: router_pb2.ChatMessages, config: ToolConfig) -> ToolPlan | None:
    """The request's tool plan, None when it has no tools; InvalidRequestError for a bad one."""
    choice = chat.tool_choice.WhichOneof("choice") if chat.HasField("tool_choice") else None
    if choice == "function":
        mode = "named"
    elif choice == "mode":
        mode = chat.tool_choice.mode
        if mode not in ("none", "auto", "required"):
            raise InvalidRequestError(f'tool_choice must be "none", "auto", "required" or a function, got {mode!r}')
    else:
        mode = "auto" if chat.tools else "none"
    if not chat.tools:
        if mode != "none":
            raise InvalidRequestError("tool_choice needs tools: none were given")
        if chat.HasField("parallel_tool_calls"):
            raise InvalidRequestError("parallel_tool_calls needs tools: none were given")
        return None
    schemas = _parameters(chat.tools)
    tools = [_template_tool(t, schemas[t.name]) for t in chat.tools]
    single = chat.HasField("parallel_tool_calls") and not chat.parallel_tool_calls
    if mode == "auto" and not config.auto:
        raise InvalidRequestError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                  "to be set on the server")
    if mode == "none":
        return ToolPlan(mode, tools, None)
    if mode == "auto":
        return ToolPlan(mode, tools, config.parser, single=single)
    if mode == "named":
        name = chat.tool_choice.function
        if name not in schemas:
            raise InvalidRequestError(f"tool_choice names the function {name!r}, which is not among the tools")
        constraint = common_pb2.StructuredOutput(json_schema=json.dumps(schemas[name]))
        return ToolPlan(mode, tools, "named", name, constraint)
    constraint = common_pb2.StructuredOutput(json_schema=json.dumps(required_schema(schemas, single)))
    return ToolPlan(mode, tools, "required", None, constraint)


async def with_tool_calls(stream: AsyncIterator[common_pb2.GenerateResponse],
                          plan: ToolPlan) -> AsyncIterator[common_pb2.GenerateResponse]:
    """gRPC replies: each sequence's text streams as the model writes it (markup included);
    its finishing delta carries the calls parsed out of the whole text."""
    texts: dict[int, list[str]] = {}
    try:
        async for response in stream:
            for delta in response.outputs:
                texts.setdefault(delta.index, []).append(delta.text)
                if delta.finish_reason:
                    _, calls = parse(plan.parser(), "".join(texts.pop(delta.index)))
                    delta.tool_calls.extend(common_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments)
                                            for c in calls)
                    delta.finish_reason = plan.finish_reason(delta.finish_reason, bool(calls))
            yield response
    finally:
        await stream.aclose()  # closed early: cancel the decode call now


def required_schema(schemas: dict[str, dict[str, Any]], single: bool) -> dict[str, Any]:
    """A JSON array of at least one call `{"name": ..., "parameters": ...}` of the given
    functions (exactly one when `single`: parallel_tool_calls=false)."""
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
              "required": ["name", "parameters"]} for name, schema in schemas.items()]
    array: dict[str, Any] = {"type": "array", "minItems": 1,
                             "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if single:
        array["maxItems"] = 1
    return array


def template_messages(chat: router_pb2.ChatMessages) -> list[dict[str, Any]]:
    """The chat as templates take it: tool calls with their arguments as objects (as in
    transformers' examples, and as vLLM passes them), tool results with their call's id."""
    messages = []
    for m in chat.messages:
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                                     for c in m.tool_calls]
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.name:
            message["name"] = m.name
        messages.append(message)
    return messages


def _arguments(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return text  # a template may still show it as it came


def _parameters(tools: list[router_pb2.Tool]) -> dict[str, dict[str, Any]]:
    """Each function's parameters schema by name (an empty one: any object)."""
    schemas: dict[str, dict[str, Any]] = {}
    for tool in tools:
        if not _FUNCTION_NAME.match(tool.name):
            raise InvalidRequestError(f"tool function names must be 1 to 64 letters, digits, '_', '.' or '-', "
                                      f"got {tool.name!r}")
        if tool.name in schemas:
            raise InvalidRequestError(f"two tools are named {tool.name!r}")
        try:
            schema = json.loads(tool.parameters) if tool.parameters else _ANY_OBJECT
        except (ValueError, RecursionError) as e:
            raise InvalidRequestError(f"the parameters of tool {tool.name!r} are not valid JSON") from e
        if not isinstance(schema, dict):
            raise InvalidRequestError(f"the parameters of tool {tool.name!r} must be a JSON schema object")
        schemas[tool.name] = schema
    return schemas


def _template_tool(tool: router_pb2.Tool, parameters: dict[str, Any]) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = parameters
    return {"type": "function", "function": function}
