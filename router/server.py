"""The router's gRPC service: validate, tokenize once, route, stream back.

    Generate -> prepare: bounds and params (limits.py), a chat's tools (tool_calls.py: a
                         required or named call becomes the request's constraint), then
                         tokenize (chat template with the tools; on offload threads, never
                         on the event loop): INVALID_ARGUMENT before any work
             -> stream:  routing.RouteSelector: block hashes, prefix index, policy:
                         a decode instance, then a prefill instance or none
                         DecodeWorker.GenerateStream, one per decode instance shared by
                         all requests (decode_stream.py): start(prompt ids, params, prefill id)
                         (RESOURCE_EXHAUSTED before any token: the next best instance;
                         a broken or stalled stream: migration.py, another instance resumes it)
                         the decode worker's deltas back, with usage and the disaggregation record
                         (a chat with tools: the parsed calls on each sequence's finishing delta)

`prepare` and `stream` know nothing of gRPC servicer contexts, so the HTTP front runs
requests through the same two calls; errors are typed (services/engine/errors.py) and mapped
to a status once, at each edge.

Deadlines travel with each request to the decode worker (at most --request-timeout); a client
cancel sends a cancel for its request (decode then aborts it, and aborts its prefill call).
Request ids: the id the client chose (GenerateRequest.request_id, or x-request-id metadata;
over HTTP the x-request-id header) is echoed in replies (responses' request_id, x-request-id
initial metadata / HTTP header) and prefixes the id the workers know the request by,
"<client id>-<fresh uuid4 hex>": every log line on the router, decode and prefill names it, and
two clients choosing the same id still get distinct requests, neither able to name the other's.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2
from router import metrics as router_metrics
from router import tool_calls
from router.limits import Limits
from router.decode_stream import DecodeStream, StreamError
from router.migration import Attempts, Broken, MigrationPolicy, Refused
from router.policy import Route, RoutingPolicy
from router.registry import Instance, StaticRegistry
from router.routing import RouteSelector
from router.tool_calls import ToolConfig, ToolPlan
from services.engine.errors import InvalidRequestError, NotFoundError, OverloadedError, PdserveError, UpstreamError
from services.engine import structured_output
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer
from services.fleet.directory import FleetDirectory
from services.rpc import metrics
from services.rpc.convert import params_from_proto, reject_unknown_fields
from services.rpc.server import REQUEST_ID_KEY, abort_with, request_id_var

log = logging.getLogger("pdserve.router")
T = TypeVar("T")

MAX_CLIENT_ID_CHARS = 128
_CLIENT_ID = re.compile(r"[!-~]+")  # printable ASCII without spaces: safe in logs and gRPC metadata


def internal_request_id(client_id: str) -> str:
    """The id the workers know a request by: unique, prefixed by the client's (checked) id."""
    if not client_id:
        return uuid.uuid4().hex
    if len(client_id) > MAX_CLIENT_ID_CHARS or not _CLIENT_ID.fullmatch(client_id):
        raise InvalidRequestError(f"request_id (x-request-id) must be 1 to {MAX_CLIENT_ID_CHARS} printable ASCII "
                                  "characters without spaces")
    return f"{client_id}-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Prepared:
    """A validated request: the id the workers know it by (always the router's own), the
    id the client gave (kept for logs and replies), prompt token ids and sampling params."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    client_request_id: str = ""
    tools: ToolPlan | None = None  # a chat with tools: how to read calls out of the output

    @property
    def reply_id(self) -> str:
        return self.client_request_id or self.request_id


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(
        self,
        registry: StaticRegistry,
        policy: RoutingPolicy,
        tokenizer: Tokenizer | None,
        model_name: str,
        max_model_len: int,
        vocab_size: int,
        directory: FleetDirectory | None = None,
        block_size: int = 16,
        limits: Limits = Limits(),
        offload_threads: int = 2,
        migration: MigrationPolicy = MigrationPolicy(),
        tools: ToolConfig = ToolConfig(),
        chat_template: str | None = None,
    ) -> None:
        """`directory` is the fleet registry with its prefix index (None: route on load alone);
        `block_size` must be the workers' (the router computes the same block hashes).
        Prompts are tokenized, and large HTTP bodies parsed, by `offload_threads` threads;
        `migration` bounds how requests move off decode instances that fail them; `tools`
        and `chat_template` (Jinja text; None: the model's own) are how chats are rendered and
        tool calls read (router/tool_calls.py)."""
        self.registry = registry
        self.policy = policy
        self.selector = RouteSelector(registry, policy, directory, block_size)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.limits = limits
        self.migration = migration
        self.tools = tools
        self.chat_template = chat_template
        self._pool = ThreadPoolExecutor(max(1, offload_threads), thread_name_prefix="router-offload")

    async def offload(self, fn: Callable[..., T], *args) -> T:
        """Run `fn` on the offload threads (tokenizers release the GIL while they encode)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- validation: cheap checks first, then tokenization ----------------------------------

    def check_prompt_size(self, request: router_pb2.GenerateRequest) -> None:
        """Bound the prompt before any tokenizing."""
        kind = request.WhichOneof("prompt")
        if kind == "token_ids":
            if len(request.token_ids.ids) >= self.max_model_len:
                raise InvalidRequestError(self._too_long(len(request.token_ids.ids)))
            return
        if kind == "text":
            chars = len(request.text)
        elif kind == "chat":  # tools and calls are rendered into the prompt too
            chat = request.chat
            chars = sum(len(m.content) + len(m.role) + sum(len(c.arguments) + len(c.name) for c in m.tool_calls)
                        for m in chat.messages) + sum(len(t.parameters) + len(t.description) for t in chat.tools)
        else:
            raise InvalidRequestError("a prompt (text, token_ids or chat) is required")
        cap = self.limits.prompt_chars(self.max_model_len)
        if chars > cap:
            raise InvalidRequestError(f"the prompt has {chars} characters; at most {cap} are accepted "
                                      f"(this model's context is {self.max_model_len} tokens)")

    def prompt_ids(self, request: router_pb2.GenerateRequest, tools: ToolPlan | None = None) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "text":
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token_ids")
            ids = self.tokenizer.encode(request.text)
        elif kind == "chat":
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: chat prompts need one")
            messages = tool_calls.template_messages(request.chat)
            if not messages:
                raise InvalidRequestError("chat has no messages")
            ids = self.tokenizer.apply_chat_template(messages, tools.tools if tools else None, self.chat_template)
        else:
            ids = list(request.token_ids.ids)
        if request.HasField("truncate_prompt_tokens"):
            ids = ids[-request.truncate_prompt_tokens:]
        if not ids:
            raise InvalidRequestError("prompt is empty")
        if max(ids) >= self.vocab_size:
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(self._too_long(len(ids)))
        return ids

    def _too_long(self, tokens: int) -> str:
        return (f"prompt has {tokens} tokens; this model's context is {self.max_model_len} tokens, "
                "including at least one generated token")

    def check_model(self, model: str) -> None:
        if model and model != self.model_name:
            raise NotFoundError(f"model {model!r} is not served here (serving {self.model_name!r})")

    def check(self, request: router_pb2.GenerateRequest) -> SamplingParams:
        """Everything about a request that needs no tokenizer (INVALID_ARGUMENT / NOT_FOUND)."""
        reject_unknown_fields(request)
        self.check_model(request.model)
        self.limits.check_priority(request.priority)
        if request.HasField("truncate_prompt_tokens") and not 0 < request.truncate_prompt_tokens < self.max_model_len:
            raise InvalidRequestError(f"truncate_prompt_tokens must be in [1, {self.max_model_len}), "
                                      f"got {request.truncate_prompt_tokens}")
        params = params_from_proto(request.sampling)
        self.limits.check_sequences(1, params.n)
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this model has none")
        if any(t >= self.vocab_size for t, _ in params.logit_bias):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {self.vocab_size})")
        if params.allowed_token_ids is not None and params.allowed_token_ids[-1] >= self.vocab_size:
            raise InvalidRequestError(f"allowed_token_ids must be in [0, {self.vocab_size})")
        if params.bad_words and self.tokenizer is None:
            raise InvalidRequestError("bad_words need a tokenizer; this model has none")
        if params.structured_output is not None and self.tokenizer is None:
            raise InvalidRequestError("structured output needs a tokenizer; this model has none")
        self.check_prompt_size(request)
        return params

    async def prepare(self, request: router_pb2.GenerateRequest, max_tokens_given: bool | None = None) -> Prepared:
        """Validate a request and tokenize its prompt, once; raises a PdserveError subclass
        (INVALID_ARGUMENT / NOT_FOUND) before any work is sent anywhere.

        A max_tokens the client gave must fit the context beside the prompt (an error, never a
        silent truncation); one it did not give is clamped to the context by the engine.
        `max_tokens_given`: whether the client gave it (default: whether the message sets it)."""
        params = self.check(request)
        tools = tool_calls.plan(request.chat, self.tools) if request.WhichOneof("prompt") == "chat" else None
        if tools is not None and tools.constraint is not None:
            params = self._force_tool_call(request, params, tools)
        request_id = internal_request_id(request.request_id)
        if params.structured_output is not None:
            await self.offload(check_structured_output, params.structured_output)  # the workers compile it
        if request.WhichOneof("prompt") == "token_ids":
            ids = self.prompt_ids(request)
        else:  # tokenizers and chat templates run on the offload threads, whatever the prompt's length
            ids = await self.offload(self.prompt_ids, request, tools)
        given = request.sampling.HasField("max_tokens") if max_tokens_given is None else max_tokens_given
        if given and len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"this model's context is {self.max_model_len} tokens, but {len(ids) + params.max_tokens} were "
                f"requested ({len(ids)} in the prompt, {params.max_tokens} to generate): lower max_tokens or "
                "shorten the prompt")
        return Prepared(request_id, ids, params, request.request_id, tools)

    def _force_tool_call(self, request: router_pb2.GenerateRequest, params: SamplingParams,
                         tools: ToolPlan) -> SamplingParams:
        """required / named tool_choice: the call's schema becomes the request's constraint (on
        the message too: decode samples with the request's own sampling params)."""
        if params.structured_output is not None:
            raise InvalidRequestError(f'tool_choice "{tools.mode}" constrains the output itself: it cannot be '
                                      "combined with response_format or guided_* fields")
        if self.tokenizer is None:
            raise InvalidRequestError(f'tool_choice "{tools.mode}" needs structured output, which needs a '
                                      "tokenizer; this model has none")
        request.sampling.structured_output.CopyFrom(tools.constraint)
        return params_from_proto(request.sampling)

    # ---- routing and streaming ------------------------------------------------------------

    async def stream(
        self, prepared: Prepared, request: router_pb2.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        """Route a prepared request and stream the decode worker's responses back.

        Transport-agnostic: the gRPC `Generate` and the HTTP front both run requests through
        here. Retries and migration (router/migration.py): a decode instance that refuses the
        request as overloaded before streaming anything is skipped for the next best one (when
        every one refuses, OverloadedError: RESOURCE_EXHAUSTED / 429); one whose stream breaks
        or stalls hands the request, with what it already streamed, to another, and the client's
        stream goes on (at most `--migration-limit` times). Raises UnavailableError when no
        decode instance is available and UpstreamError when a decode worker ends the call with
        another error status, or the last migration failed too. Closing the iterator early
        cancels the decode call (decode then aborts, and aborts its prefill call).
        """
        timer = metrics.StreamTimer()
        attempts = Attempts(self.migration, prepared.params.n)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                route = await self._route(prepared, attempts)
                try:
                    async for response in self._attempt(prepared, request, route, deadline, timer, attempts):
                        yield response
                    return
                except Refused:
                    attempts.refused.add(route.decode.instance_id)
                except Broken as e:
                    attempts.broke(route.decode.instance_id, e)  # raises once the limit is spent
                    router_metrics.MIGRATIONS.labels(e.reason).inc()
                    log.warning("request %s: %s; migrating it (%d of at most %d) with %d tokens streamed",
                                prepared.request_id, e, attempts.migrations, self.migration.limit,
                                attempts.progress.completion_tokens)
        finally:
            timer.flush()  # the inter-token gaps into the histogram, however the stream ended

    async def _route(self, prepared: Prepared, attempts: Attempts) -> Route:
        """The next instances to try; raises the error for the client when none is left."""
        ids, salt = prepared.prompt_token_ids, prepared.params.cache_salt
        route = await self.selector.select(ids, salt, exclude=attempts.exclude())
        if route is None and attempts.failed:
            route = await self.selector.select(ids, salt, exclude=attempts.fallback_exclude())
        if route is None:
            error = attempts.no_route()
            if isinstance(error, OverloadedError):
                metrics.ADMISSION_REJECTIONS.labels("router").inc()
            raise error
        return route

    async def _attempt(self, prepared: Prepared, request: router_pb2.GenerateRequest, route: Route,
                       deadline: float | None, timer: metrics.StreamTimer,
                       attempts: Attempts) -> AsyncIterator[common_pb2.GenerateResponse]:
        """One decode instance's try. Raises Refused if it is overloaded before any response,
        Broken if its stream breaks or stalls (the request may migrate)."""
        ids, progress = prepared.prompt_token_ids, attempts.progress
        # Ids differ per attempt: an instance that failed the request may be tried again.
        request_id = prepared.request_id if not attempts.migrating else f"{prepared.request_id}-m{attempts.migrations}"
        resume = attempts.progress.resume()
        decode, prefill = route.decode, (route.prefill if not resume else None)  # a resumed request prefills on decode
        log.info("request %s (%s): %d prompt tokens -> decode %s (%s, %d cached), prefill %s (%s)%s", request_id,
                 prepared.client_request_id or "-", len(ids), decode.instance_id, route.decode_reason,
                 route.decode_hit_tokens, prefill.instance_id if prefill else "local", route.prefill_reason,
                 f", resuming {len(resume)} sequence(s)" if resume else "")
        decode_request = worker_pb2.DecodeRequest(
            request_id=request_id,
            prompt_token_ids=ids,
            sampling=request.sampling,
            priority=request.priority,
            prefill_instance=prefill.instance_id if prefill else "",
            migrated=attempts.migrating,
            resume=resume,
            heartbeat_ms=self.migration.heartbeat_ms,
        )
        decode.in_flight += 1
        if prefill:
            prefill.in_flight += 1
        started = False
        # Decode's replies carry the id it knows the request by: the reply id unless the client
        # chose its own or the request migrated (only then is a rewrite per response needed).
        rename = bool(prepared.client_request_id) or attempts.migrating
        reply_id = prepared.reply_id
        try:
            timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
            stream = self._decode_stream(decode).start(decode_request, timeout)
            try:
                while True:
                    try:
                        response = await stream.read()
                    except Broken as e:
                        raise Broken(e.code, f"decode {decode.instance_id} {e}", e.reason) from None
                    finished = response.finished
                    if not finished and not response.outputs:
                        continue  # nothing new (heartbeats travel as empty frames: none expected)
                    if not started:
                        started = True
                        attempts.started(decode.instance_id)
                    if timer.tokens(progress.add(response)) and prefill:
                        prefill.in_flight -= 1  # prefill's part is done once the first token is out
                        prefill = None
                    if finished:
                        self._finish(response, timer, attempts)
                    if rename:
                        response.request_id = reply_id
                    yield response
                    if finished:
                        return
            except StreamError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not started and not attempts.migrating:
                    log.info("request %s: decode %s is at its admission limit", request_id, decode.instance_id)
                    raise Refused() from e
                if self.migration.migratable(e.code()):
                    raise Broken(e.code().name, f"decode {decode.instance_id}: {e.code().name} {e.details()}") from e
                log.warning("request %s: decode %s failed: %s %s", request_id, decode.instance_id, e.code().name,
                            e.details())
                raise UpstreamError(e.code().name, f"decode {decode.instance_id}: {e.details()}") from e
            finally:
                stream.close()  # a no-op once the request ended; cancels it on decode when we stop early
        finally:
            decode.in_flight -= 1
            if prefill:
                prefill.in_flight -= 1

    def _decode_stream(self, decode: Instance) -> DecodeStream:
        """This router's shared stream to `decode` (router/decode_stream.py), made on first use."""
        if decode.stream is None:
            decode.stream = DecodeStream(decode.stub, self.migration.stall_timeout)
        return decode.stream

    @staticmethod
    def _finish(response: common_pb2.GenerateResponse, timer: metrics.StreamTimer, attempts: Attempts) -> None:
        """The last message: usage and record cover every attempt."""
        timer.finished([c.finish_reason for c in response.outputs])
        response.usage.completion_tokens = attempts.progress.completion_tokens
        response.disaggregation.decode_instances[:] = attempts.used
        router_metrics.PROMPT_TOKENS.inc(response.usage.prompt_tokens)
        router_metrics.CACHED_TOKENS.inc(response.disaggregation.decode_cached_tokens)

    # ---- RPCs ----------------------------------------------------------------------------

    async def Generate(self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        if not request.request_id:  # the id in the message wins over the metadata's
            request.request_id = next((v for k, v in context.invocation_metadata() or () if k == REQUEST_ID_KEY), "")
        try:
            prepared = await self.prepare(request)
        except PdserveError as e:
            await abort_with(context, e)
        request_id_var.set(prepared.request_id)
        await context.send_initial_metadata(((REQUEST_ID_KEY, prepared.reply_id),))
        remaining = context.time_remaining()
        timeout = self.limits.request_timeout if remaining is None else min(remaining, self.limits.request_timeout)
        stream = self.stream(prepared, request, timeout)
        if prepared.tools is not None and prepared.tools.parser_kind:
            stream = tool_calls.with_tool_calls(stream, prepared.tools)
        try:
            async for response in stream:
                yield response
        except PdserveError as e:
            await abort_with(context, e)

    async def Tokenize(self, request: router_pb2.TokenizeRequest, context) -> router_pb2.TokenizeResponse:
        try:
            reject_unknown_fields(request)
            self.check_model(request.model)
            cap = self.limits.prompt_chars(self.max_model_len)
            if len(request.text) > cap:
                raise InvalidRequestError(f"the text has {len(request.text)} characters; at most {cap} are accepted")
        except PdserveError as e:
            await abort_with(context, e)
        if self.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this model has no tokenizer")
        return router_pb2.TokenizeResponse(token_ids=await self.offload(self.tokenizer.encode, request.text))

    async def ListModels(self, request, context) -> router_pb2.ListModelsResponse:
        return router_pb2.ListModelsResponse(
            models=[router_pb2.ModelInfo(id=self.model_name, max_model_len=self.max_model_len)]
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def check_structured_output(constraint) -> None:
    """structured_output.check, with a schema too deeply nested to walk as a bad request."""
    try:
        structured_output.check(constraint)
    except RecursionError as e:
        raise InvalidRequestError("the structured output constraint is nested too deeply") from e

