"""OpenAI's Responses API (POST /v1/responses), text in and text out, over the chat path:

    {input, instructions} -> chat messages (instructions first, as a system message)
    max_output_tokens, temperature, top_p, seed -> the chat request's sampling fields
    -> RouterServicer.prepare / stream -> one assistant message with one output_text part

Streaming sends typed events, each with a sequence_number: response.created,
response.in_progress, response.output_item.added, response.content_part.added,
response.output_text.delta (one per decode delta), response.output_text.done,
response.content_part.done, response.output_item.done, then response.completed (or
response.incomplete when max_output_tokens cut it short). Nothing is stored: a request with
previous_response_id, asking for tools or for a text.format other than text, is refused with
a 400 naming the field.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pdserve.v1 import common_pb2
from router import openai_protocol as protocol
from router.openai_api import (INLINE_BODY_BYTES, REQUEST_ID_HEADER, ClientDisconnected, error_body, error_response,
                               merge, parse_body, request_id_of, until_disconnected, validation_error)
from router.openai_format import Usage, sse
from router.server import RouterServicer
from services.engine.errors import InvalidRequestError, PdserveError


class InputText(protocol.RequestBody):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(protocol.RequestBody):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]


class ResponsesRequest(protocol.RequestBody):
    model: str
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    text: dict[str, Any] | None = None  # only {"format": {"type": "text"}}
    store: bool | None = None  # accepted: nothing is stored either way
    metadata: dict[str, str] | None = None
    user: str | None = None


class ResponsesServer:
    def __init__(self, servicer: RouterServicer) -> None:
        self.servicer = servicer

    def routes(self) -> list[Route]:
        return [Route("/v1/responses", self.create, methods=["POST"])]

    async def create(self, request: Request) -> Response:
        servicer = self.servicer
        try:
            raw = await request.body()
            if len(raw) > INLINE_BODY_BYTES:
                body = await servicer.offload(parse_body, raw, ResponsesRequest)
            else:
                body = parse_body(raw, ResponsesRequest)
            protocol.screen(body)
            chat = _chat_body(body)
            rid = f"resp_{uuid.uuid4().hex}"
            client_id = request_id_of(request)
            generate = protocol.chat_request(chat, client_id or rid, servicer.max_model_len)
            prepared = await servicer.prepare(generate, max_tokens_given=body.max_output_tokens is not None)
            stream = merge([servicer.stream(prepared, generate, servicer.limits.request_timeout)])
            shape = ResponseShape(rid, body)
            headers = {REQUEST_ID_HEADER: client_id or rid}
            if body.stream:
                first = await until_disconnected(request, anext(stream, None))
                return StreamingResponse(shape.events(first, stream), media_type="text/event-stream", headers=headers)
            text, finish, usage = await until_disconnected(request, _collect(stream))
            return JSONResponse(shape.response(text, finish, usage), headers=headers)
        except ValidationError as e:
            return validation_error(e)
        except PdserveError as e:
            return error_response(e)
        except ClientDisconnected:
            return Response(status_code=499)


def _chat_body(body: ResponsesRequest) -> protocol.ChatCompletionRequest:
    if body.previous_response_id is not None:
        raise InvalidRequestError("previous_response_id is not supported: this server stores no responses; "
                                  "send the whole conversation as input")
    if body.tools:
        raise InvalidRequestError("tools are not supported on /v1/responses; use /v1/chat/completions")
    fmt = (body.text or {}).get("format") or {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") != "text":
        raise InvalidRequestError("text.format other than text is not supported on /v1/responses; "
                                  "use response_format on /v1/chat/completions")
    messages = [{"role": "system", "content": body.instructions}] if body.instructions is not None else []
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
    else:
        for item in body.input:
            content = item.content if isinstance(item.content, str) else "\n".join(p.text for p in item.content)
            messages.append({"role": item.role, "content": content})
    return protocol.ChatCompletionRequest(model=body.model, messages=messages, max_tokens=body.max_output_tokens,
                                          temperature=body.temperature, top_p=body.top_p, seed=body.seed)


async def _collect(stream: AsyncIterator[tuple[int, common_pb2.GenerateResponse]]) -> tuple[str, str, Usage]:
    text, finish, usage = [], "", Usage()
    async for _, response in stream:
        for delta in response.outputs:
            text.append(delta.text)
            finish = delta.finish_reason or finish
        if response.finished:
            usage.add(response.usage)
    return "".join(text), finish, usage


class ResponseShape:
    """The response object and stream events of one request."""

    def __init__(self, response_id: str, body: ResponsesRequest) -> None:
        self.id = response_id
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.body = body
        self.created = int(time.time())
        self._sequence = 0

    def response(self, text: str | None, finish: str, usage: Usage | None) -> dict[str, Any]:
        """The response object; text None: still in progress."""
        b = self.body
        status = "in_progress" if text is None else "incomplete" if finish == "length" else "completed"
        return {
            "id": self.id, "object": "response", "created_at": self.created, "model": b.model, "status": status,
            "output": [] if text is None else [self._item(text, "completed")],
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "temperature": b.temperature,
            "top_p": b.top_p, "previous_response_id": None, "parallel_tool_calls": False, "tool_choice": "none",
            "tools": [], "text": {"format": {"type": "text"}}, "error": None, "metadata": b.metadata or {},
            "store": False, "usage": None if usage is None else _usage(usage),
        }

    def _item(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [_part(text)]
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

    def _event(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\n" + sse(event)

    async def events(self, first: tuple[int, common_pb2.GenerateResponse] | None,
                     stream: AsyncIterator[tuple[int, common_pb2.GenerateResponse]]) -> AsyncIterator[str]:
        at = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        yield self._event("response.created", response=self.response(None, "", None))
        yield self._event("response.in_progress", response=self.response(None, "", None))
        yield self._event("response.output_item.added", output_index=0, item=self._item(None, "in_progress"))
        yield self._event("response.content_part.added", **at, part=_part(""))
        text, finish, usage = [], "", Usage()
        try:
            item = first
            while item is not None:
                _, response = item
                for delta in response.outputs:
                    finish = delta.finish_reason or finish
                    if delta.text:
                        text.append(delta.text)
                        yield self._event("response.output_text.delta", **at, delta=delta.text, logprobs=[])
                if response.finished:
                    usage.add(response.usage)
                item = await anext(stream, None)
        except PdserveError as e:
            error = error_body(e)["error"]
            yield self._event("error", code=error["code"], message=error["message"], param=error["param"])
            return
        finally:
            await stream.aclose()
        whole = "".join(text)
        yield self._event("response.output_text.done", **at, text=whole, logprobs=[])
        yield self._event("response.content_part.done", **at, part=_part(whole))
        yield self._event("response.output_item.done", output_index=0, item=self._item(whole, "completed"))
        done = self.response(whole, finish, usage)
        yield self._event(f"response.{done['status']}", response=done)


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(usage: Usage) -> dict[str, Any]:
    return {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens_details": {"reasoning_tokens": 0}}
