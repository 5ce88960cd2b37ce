"""vLLM's endpoints beside the OpenAI API, in vLLM's shapes, behind the same gate (API keys,
header and body caps) as /v1:

    POST /tokenize        {prompt} or {messages}  -> {count, max_model_len, tokens, token_strs}
    POST /detokenize      {tokens}                -> {prompt}
    GET  /tokenizer_info                          -> the tokenizer's class, special tokens, chat template
    GET  /version                                 -> {version}
    POST /v1/embeddings                           -> 400: this server serves generative models
    POST /invocations     (SageMaker)             -> /v1/chat/completions if the body has messages,
                                                     /v1/responses if it has input, else /v1/completions

Tokenizers and chat templates run on the router's offload threads, never on the event loop.
"""

from __future__ import annotations

import json
from importlib import metadata
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pdserve.v1 import router_pb2
from router import openai_protocol as protocol
from router.openai_api import OpenAIServer, error_response, parse_body, validation_error
from services.engine.errors import InvalidRequestError, PdserveError

MAX_DETOKENIZE_TOKENS = 1 << 20


class TokenizeCompletion(protocol.RequestBody):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChat(protocol.RequestBody):
    model: str | None = None
    messages: list[protocol.ChatMessage]
    return_token_strs: bool = False


class Detokenize(protocol.RequestBody):
    model: str | None = None
    tokens: list[int]


class VllmServer:
    """The routes above, over the OpenAI server (its servicer, tokenizer and handlers)."""

    def __init__(self, openai: OpenAIServer, responses) -> None:
        self.openai = openai
        self.responses = responses
        self.servicer = openai.servicer

    def routes(self) -> list[Route]:
        return [
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/tokenizer_info", self.tokenizer_info, methods=["GET"]),
            Route("/version", self.version, methods=["GET"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/invocations", self.invocations, methods=["POST"]),
        ]

    async def tokenize(self, request: Request) -> Response:
        servicer = self.servicer
        try:
            raw = await request.body()
            chat = b'"messages"' in raw
            body = parse_body(raw, TokenizeChat if chat else TokenizeCompletion)
            protocol.screen(body)
            servicer.check_model(body.model or "")
            tokenizer = self._tokenizer()
            if chat:
                msg = router_pb2.GenerateRequest(chat=router_pb2.ChatMessages(
                    messages=[protocol.chat_message(m) for m in body.messages]))
                servicer.check_prompt_size(msg)
                ids = await servicer.offload(servicer.prompt_ids, msg)
            else:
                servicer.check_prompt_size(router_pb2.GenerateRequest(text=body.prompt))
                ids = await servicer.offload(tokenizer.encode, body.prompt, body.add_special_tokens)
            strs = await servicer.offload(tokenizer.hf.convert_ids_to_tokens, ids) if body.return_token_strs else None
        except ValidationError as e:
            return validation_error(e)
        except PdserveError as e:
            return error_response(e)
        return JSONResponse({"count": len(ids), "max_model_len": servicer.max_model_len, "tokens": ids,
                             "token_strs": strs})

    async def detokenize(self, request: Request) -> Response:
        servicer = self.servicer
        try:
            body = parse_body(await request.body(), Detokenize)
            protocol.screen(body)
            servicer.check_model(body.model or "")
            tokenizer = self._tokenizer()
            if len(body.tokens) > MAX_DETOKENIZE_TOKENS:
                raise InvalidRequestError(f"tokens: at most {MAX_DETOKENIZE_TOKENS} token ids are accepted")
            if any(not 0 <= t < servicer.vocab_size for t in body.tokens):
                raise InvalidRequestError(f"tokens must be token ids in [0, {servicer.vocab_size})")
            text = await servicer.offload(tokenizer.decode, body.tokens, False)
        except ValidationError as e:
            return validation_error(e)
        except PdserveError as e:
            return error_response(e)
        return JSONResponse({"prompt": text})

    async def tokenizer_info(self, request: Request) -> Response:
        try:
            hf = self._tokenizer().hf
        except PdserveError as e:
            return error_response(e)
        info: dict[str, Any] = {"tokenizer_class": type(hf).__name__, "model_max_length": self.servicer.max_model_len,
                                "vocab_size": self.servicer.vocab_size, "chat_template": hf.chat_template}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            info[name] = getattr(hf, name, None)
        info["added_tokens_decoder"] = {str(i): t.content for i, t in hf.added_tokens_decoder.items()}
        return JSONResponse(info)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": _version()})

    async def embeddings(self, request: Request) -> Response:
        return error_response(InvalidRequestError(
            f"this server serves generative models ({self.servicer.model_name}): /v1/embeddings is not supported; "
            "use /v1/completions, /v1/chat/completions or /v1/responses"))

    async def invocations(self, request: Request) -> Response:
        """SageMaker's one endpoint: the body's shape says which API it is for."""
        try:
            raw = await request.body()
            body = json.loads(raw) if len(raw) <= 64 << 10 else await self.servicer.offload(json.loads, raw)
        except ValueError:
            return error_response(InvalidRequestError("the body is not valid JSON"))
        if not isinstance(body, dict):
            return error_response(InvalidRequestError("the body must be a JSON object"))
        if "messages" in body:
            return await self.openai.chat_completions(request)
        if "input" in body:
            return await self.responses.create(request)
        if "prompt" in body:
            return await self.openai.completions(request)
        return error_response(InvalidRequestError(
            "/invocations takes a chat completions body (messages), a responses body (input) or a completions body "
            "(prompt)"))

    def _tokenizer(self):
        if self.servicer.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer")
        return self.servicer.tokenizer


def _version() -> str:
    try:
        return metadata.version("pdserve")
    except metadata.PackageNotFoundError:  # run from a checkout without installing
        return "0.1.0+source"
