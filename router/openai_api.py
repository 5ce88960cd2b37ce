"""The OpenAI-compatible HTTP API on the router's HTTP port: /v1/models, /v1/completions,
/v1/chat/completions, streaming as server-sent events or one JSON body.

    body --openai_protocol--> GenerateRequest(s) --RouterServicer.prepare--> Prepared (400/404 here)
         --RouterServicer.stream--> decode's GenerateResponses --openai_format--> JSON / SSE chunks

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the HTTP
status of the typed error (400 bad request, 404 unknown model, 429 overloaded, 503 no
instance). A stream sends its headers only once the first tokens are out, so routing and
worker errors still get their status; an error after that is a final `data: {"error": ...}`.

A client that disconnects cancels its request end to end: the decode call is cancelled,
decode aborts the request (and its prefill call) and frees every block.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pdserve.v1 import common_pb2, router_pb2
from router import openai_protocol as protocol
from router.openai_format import ChoiceState, ResponseFormat, TokenStrings, Usage, sse
from router.server import RouterServicer
from services.engine.errors import InvalidRequestError, PdserveError

T = TypeVar("T")

# HTTP status -> OpenAI error type (the client picks its exception class from the status).
_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 409: "conflict_error",
                429: "rate_limit_error", 503: "service_unavailable_error", 504: "timeout_error"}


INLINE_BODY_BYTES = 64 << 10  # smaller bodies are parsed on the event loop (well under a millisecond)
RETRY_AFTER_S = 1  # an overloaded worker's queue turns over within seconds
REQUEST_ID_HEADER = "x-request-id"


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was complete."""


def error_response(err: PdserveError, param: str | None = None) -> JSONResponse:
    """An OpenAI-shaped error body with the HTTP status of `err`'s type (429 says when to retry)."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if err.http_status == 429 else None
    return JSONResponse(error_body(err, param), status_code=err.http_status, headers=headers)


def error_body(err: PdserveError, param: str | None = None) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(err.http_status, "internal_error")
    if param is None:  # engine messages name the field first: "temperature must be >= 0, got -1"
        match = re.match(r"([a-z_]+)[ =]", str(err))
        param = match.group(1) if match and match.group(1) in _FIELDS else None
    return {"error": {"message": str(err), "type": kind, "param": param, "code": err.grpc_status.lower()}}


_FIELDS = (set(protocol.CompletionRequest.model_fields) | set(protocol.ChatCompletionRequest.model_fields)
           | set(protocol.REFUSED))


class OpenAIServer:
    """The /v1 routes over one RouterServicer (shared with the gRPC Router service)."""

    def __init__(self, servicer: RouterServicer) -> None:
        self.servicer = servicer
        self.tokens = TokenStrings(servicer.tokenizer)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ]

    # ---- routes --------------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: Request) -> Response:
        try:
            self.servicer.check_model(request.path_params["model"])
        except PdserveError as e:
            return error_response(e, "model")
        return JSONResponse(self._model_card())

    async def completions(self, request: Request) -> Response:
        client_id = request_id_of(request)

        def make(body: protocol.CompletionRequest) -> tuple[list[router_pb2.GenerateRequest], ResponseFormat]:
            rid = f"cmpl-{uuid.uuid4().hex}"
            requests = protocol.completion_requests(body, client_id or rid, self.servicer.max_model_len)
            echo = [self._prompt_text(r) for r in requests] if body.echo else None
            return requests, self._format("completion", rid, body, body.logprobs, echo)

        return await self._handle(request, protocol.CompletionRequest, make)

    async def chat_completions(self, request: Request) -> Response:
        client_id = request_id_of(request)

        def make(body: protocol.ChatCompletionRequest) -> tuple[list[router_pb2.GenerateRequest], ResponseFormat]:
            rid = f"chatcmpl-{uuid.uuid4().hex}"
            top = (body.top_logprobs or 0) if body.logprobs else None
            echo = protocol.chat_echo(body)
            return ([protocol.chat_request(body, client_id or rid, self.servicer.max_model_len)],
                    self._format("chat", rid, body, top, None if echo is None else [echo]))

        return await self._handle(request, protocol.ChatCompletionRequest, make)

    # ---- one request -----------------------------------------------------------------------------

    async def _handle(self, request: Request, model: type[BaseModel], make) -> Response:
        servicer = self.servicer
        try:
            raw = await request.body()  # the gate has bounded it
            if len(raw) > INLINE_BODY_BYTES:  # parsing holds the GIL for ~10 ms a MiB: a thread, not the loop
                body, requests, fmt = await servicer.offload(_build, raw, model, make)
            else:
                body, requests, fmt = _build(raw, model, make)
            servicer.limits.check_sequences(len(requests), body.n)
            given = body.requested_max_tokens is not None
            prepared = [await servicer.prepare(r, max_tokens_given=given) for r in requests]
            fmt.tools = prepared[0].tools if fmt.kind == "chat" else None
            timeout = servicer.limits.request_timeout
            streams = [servicer.stream(p, r, timeout) for p, r in zip(prepared, requests, strict=True)]
            merged = merge(streams)
            headers = {REQUEST_ID_HEADER: request_id_of(request) or fmt.id}
            if body.stream:
                # Headers wait for the first tokens, so that early errors keep their HTTP status.
                first = await until_disconnected(request, anext(merged, None))
                prompt_tokens = sum(len(p.prompt_token_ids) for p in prepared)
                return StreamingResponse(self._events(first, merged, fmt, body, prompt_tokens),
                                         media_type="text/event-stream", headers=headers)
            choices, usage, prompt_logprobs = await until_disconnected(request, self._collect(merged, fmt, body.n))
            return JSONResponse(fmt.response(choices, usage, body.n, prompt_logprobs), headers=headers)
        except ValidationError as e:
            return validation_error(e)
        except PdserveError as e:
            return error_response(e)
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it; the request is already cancelled

    async def _collect(self, merged: AsyncIterator[tuple[int, common_pb2.GenerateResponse]], fmt: ResponseFormat,
                       n: int) -> tuple[list[ChoiceState], Usage, dict[int, list[common_pb2.PositionLogprobs]]]:
        """The choices, the usage and each prompt's prompt_logprobs (prompt index -> per position)."""
        states: dict[int, ChoiceState] = {}
        usage = Usage()
        prompt_logprobs: dict[int, list[common_pb2.PositionLogprobs]] = {}
        async for prompt_index, response in merged:
            if response.prompt_logprobs:
                prompt_logprobs[prompt_index] = list(response.prompt_logprobs)
            for delta in response.outputs:
                index = prompt_index * n + delta.index
                fmt.apply(states.setdefault(index, ChoiceState(index)), delta)
            if response.finished:
                usage.add(response.usage)
        return [states[i] for i in sorted(states)], usage, prompt_logprobs

    async def _events(self, first: tuple[int, common_pb2.GenerateResponse] | None,
                      merged: AsyncIterator[tuple[int, common_pb2.GenerateResponse]], fmt: ResponseFormat,
                      body: protocol.SamplingFields, prompt_tokens: int) -> AsyncIterator[str]:
        """The SSE events; with stream_options.continuous_usage_stats every chunk carries the
        usage so far (the prompt's tokens, the completion tokens streamed until then)."""
        n, states, usage, include_usage = body.n, {}, Usage(), body.include_usage
        running = Usage(prompt_tokens=prompt_tokens) if body.continuous_usage else None
        if fmt.kind == "chat":
            for index in range(n):
                chunk = fmt.chunk([fmt.role_choice(index)], body.include_usage)
                if running is not None:
                    chunk["usage"] = running.body()
                yield sse(chunk)
        try:
            item: tuple[int, common_pb2.GenerateResponse] | None = first
            while item is not None:
                prompt_index, response = item
                for delta in response.outputs:
                    index = prompt_index * n + delta.index
                    state = states.get(index)
                    if state is None:
                        state = states[index] = ChoiceState(index)
                    if running is not None:
                        running.completion_tokens += len(delta.token_ids)
                    event = fmt.delta_event(state, delta, n, include_usage, running)
                    if event is not None:
                        yield event
                if response.finished:
                    usage.add(response.usage)
                item = await anext(merged, None)
            if body.include_usage:
                yield sse(fmt.usage_chunk(usage))
        except PdserveError as e:
            yield sse(error_body(e))
        finally:
            await merged.aclose()
        yield "data: [DONE]\n\n"

    # ---- helpers --------------------------------------------------------------------------------

    def _format(self, kind: str, rid: str, body: protocol.SamplingFields, top_logprobs: int | None,
                echo: list[str] | None = None) -> ResponseFormat:
        return ResponseFormat(kind, rid, body.model, self.tokens, top_logprobs, body.stop_token_ids or [], echo)

    def _prompt_text(self, request: router_pb2.GenerateRequest) -> str:
        if request.WhichOneof("prompt") == "text":
            return request.text
        tokenizer = self.servicer.tokenizer
        if tokenizer is None:
            raise InvalidRequestError("echo of a token-id prompt needs a tokenizer; this model has none")
        return tokenizer.decode(list(request.token_ids.ids), skip_special_tokens=False)

    def _model_card(self) -> dict[str, Any]:
        name = self.servicer.model_name
        return {"id": name, "object": "model", "created": 0, "owned_by": "pdserve", "root": name,
                "max_model_len": self.servicer.max_model_len}


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several streams as (stream index, item); the first error ends all of them."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()  # closed early: the stream cancels its decode call now, not at GC
        return
    queue: asyncio.Queue[tuple[int, T | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await queue.put((i, None, e))
            return
        await queue.put((i, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, error = await queue.get()
            if error is not None:
                raise error
            if item is None:
                remaining -= 1
                continue
            yield i, item
    finally:
        for task in tasks:
            task.cancel()  # cancelling a stream cancels its decode call


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising ClientDisconnected) if the client goes away."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            # Let the cancellation land (it closes the decode streams) before reading the outcome:
            # a task asked to cancel is not cancelled yet, and its result() would raise InvalidStateError.
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled() or not task.done():
        raise ClientDisconnected()
    return task.result()


async def _disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def request_id_of(request: Request) -> str:
    """The client's x-request-id header ("" if none); RouterServicer.prepare checks it."""
    return request.headers.get(REQUEST_ID_HEADER, "")


def _build(raw: bytes, model: type[BaseModel], make) -> tuple[Any, list[router_pb2.GenerateRequest], ResponseFormat]:
    """Body bytes -> the validated body, its GenerateRequests and their response format."""
    body = parse_body(raw, model)
    protocol.screen(body)
    requests, fmt = make(body)
    return body, requests, fmt


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError as e:
        raise InvalidRequestError("the body is not valid JSON: nested too deeply") from e
    except ValueError as e:  # includes UnicodeDecodeError
        raise InvalidRequestError(f"the body is not valid JSON: {_first_line(e)}") from e
    if not isinstance(data, dict):
        raise InvalidRequestError("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except RecursionError as e:
        raise InvalidRequestError("the body is nested too deeply") from e


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")  # JSON has no Infinity or NaN; Python's parser accepts them


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:200]


def validation_error(e: ValidationError) -> JSONResponse:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    err = InvalidRequestError(f"{loc}: {first['msg']}" if loc else first["msg"])
    return error_response(err, loc.split(".")[0] if loc else None)


