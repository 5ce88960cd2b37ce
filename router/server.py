"""The router's gRPC service: validate, tokenize once, route, stream back.

    Generate -> prepare: validate params and prompt (INVALID_ARGUMENT before any work)
             -> stream:  routing.RouteSelector: block hashes, prefix index, policy:
                         a decode instance, then a prefill instance or none
                         DecodeWorker.Generate(prompt ids, params, prefill instance id)
                         the decode worker's deltas back, with usage and the disaggregation record

`prepare` and `stream` know nothing of gRPC servicer contexts, so the HTTP front runs
requests through the same two calls; errors are typed (services/engine/errors.py) and mapped
to a status once, at each edge.

Deadlines propagate to the decode call; a client cancel cancels it (decode then aborts,
and aborts its prefill call). Every request gets an id that travels in x-request-id metadata.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2
from router import metrics as router_metrics
from router.policy import RoutingPolicy
from router.registry import StaticRegistry
from router.routing import RouteSelector
from services.engine.errors import InvalidRequestError, NotFoundError, PdserveError, UnavailableError, UpstreamError
from services.engine import structured_output
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer
from services.fleet.directory import FleetDirectory
from services.rpc import metrics
from services.rpc.convert import params_from_proto, reject_unknown_fields
from services.rpc.server import abort_with, request_id_var, request_metadata

log = logging.getLogger("pdserve.router")


@dataclass(frozen=True)
class Prepared:
    """A validated request: its id, prompt token ids and engine sampling params."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


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
    ) -> None:
        """`directory` is the fleet registry with its prefix index (None: route on load alone);
        `block_size` must be the workers' (the router computes the same block hashes)."""
        self.registry = registry
        self.policy = policy
        self.selector = RouteSelector(registry, policy, directory, block_size)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size

    # ---- validation ----------------------------------------------------------------------

    def prompt_ids(self, request: router_pb2.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "text":
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token_ids")
            ids = self.tokenizer.encode(request.text)
        elif kind == "chat":
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: chat prompts need one")
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            if not messages:
                raise InvalidRequestError("chat has no messages")
            ids = self.tokenizer.apply_chat_template(messages)
        elif kind == "token_ids":
            ids = list(request.token_ids.ids)
        else:
            raise InvalidRequestError("a prompt (text, token_ids or chat) is required")
        if not ids:
            raise InvalidRequestError("prompt is empty")
        if any(t >= self.vocab_size for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens, "
                "including at least one generated token"
            )
        return ids

    def check_model(self, model: str) -> None:
        if model and model != self.model_name:
            raise NotFoundError(f"model {model!r} is not served here (serving {self.model_name!r})")

    def prepare(self, request: router_pb2.GenerateRequest) -> Prepared:
        """Validate a request and tokenize its prompt, once; raises a PdserveError subclass
        (INVALID_ARGUMENT / NOT_FOUND) before any work is sent anywhere."""
        reject_unknown_fields(request)
        self.check_model(request.model)
        params = params_from_proto(request.sampling)
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this model has none")
        if any(t >= self.vocab_size for t, _ in params.logit_bias):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {self.vocab_size})")
        if params.structured_output is not None:
            if self.tokenizer is None:
                raise InvalidRequestError("structured output needs a tokenizer; this model has none")
            structured_output.check(params.structured_output)  # the workers compile it
        ids = self.prompt_ids(request)
        return Prepared(request.request_id or uuid.uuid4().hex, ids, params)

    async def stream(
        self, prepared: Prepared, request: router_pb2.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        """Route a prepared request and stream the decode worker's responses back.

        Transport-agnostic: the gRPC `Generate` and the HTTP front both run requests through
        here. Raises UnavailableError when no decode instance is available and UpstreamError
        when the decode worker ends the call with an error status. Closing the iterator early
        cancels the decode call (decode then aborts, and aborts its prefill call).
        """
        timer = metrics.StreamTimer()
        request_id, ids = prepared.request_id, prepared.prompt_token_ids
        route = await self.selector.select(ids, prepared.params.cache_salt)
        if route is None:
            raise UnavailableError("no decode instance is available")
        decode, prefill = route.decode, route.prefill
        log.info("request %s: %d prompt tokens -> decode %s (%s, %d cached), prefill %s (%s)", request_id, len(ids),
                 decode.instance_id, route.decode_reason, route.decode_hit_tokens,
                 prefill.instance_id if prefill else "local", route.prefill_reason)
        decode_request = worker_pb2.DecodeRequest(
            request_id=request_id,
            prompt_token_ids=ids,
            sampling=request.sampling,
            priority=request.priority,
            prefill_instance=prefill.instance_id if prefill else "",
        )
        decode.in_flight += 1
        if prefill:
            prefill.in_flight += 1
        try:
            call = decode.stub.Generate(decode_request, timeout=timeout, metadata=request_metadata(request_id))
            try:
                async for response in call:
                    if timer.tokens(sum(len(c.token_ids) for c in response.outputs)) and prefill:
                        prefill.in_flight -= 1  # prefill's part is done once the first token is out
                        prefill = None
                    if response.finished:
                        timer.finished([c.finish_reason for c in response.outputs])
                        router_metrics.PROMPT_TOKENS.inc(response.usage.prompt_tokens)
                        router_metrics.CACHED_TOKENS.inc(response.disaggregation.decode_cached_tokens)
                    yield response
            except grpc.aio.AioRpcError as e:
                log.warning("request %s: decode %s failed: %s %s", request_id, decode.instance_id, e.code().name,
                            e.details())
                raise UpstreamError(e.code().name, f"decode {decode.instance_id}: {e.details()}") from e
            finally:
                call.cancel()  # a no-op once the call completed; cancels decode when we stop early
        finally:
            decode.in_flight -= 1
            if prefill:
                prefill.in_flight -= 1

    # ---- RPCs ----------------------------------------------------------------------------

    async def Generate(self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            prepared = self.prepare(request)
        except PdserveError as e:
            await abort_with(context, e)
        request_id_var.set(prepared.request_id)
        try:
            async for response in self.stream(prepared, request, context.time_remaining()):
                yield response
        except PdserveError as e:
            await abort_with(context, e)

    async def Tokenize(self, request: router_pb2.TokenizeRequest, context) -> router_pb2.TokenizeResponse:
        try:
            self.check_model(request.model)
        except PdserveError as e:
            await abort_with(context, e)
        if self.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this model has no tokenizer")
        return router_pb2.TokenizeResponse(token_ids=self.tokenizer.encode(request.text))

    async def ListModels(self, request, context) -> router_pb2.ListModelsResponse:
        return router_pb2.ListModelsResponse(
            models=[router_pb2.ModelInfo(id=self.model_name, max_model_len=self.max_model_len)]
        )

