"""Sending requests to a running router with the generated stubs (`pdserve generate --url`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.engine.sampling_params import SamplingParams
from services.rpc.convert import params_to_proto
from services.rpc.server import CHANNEL_OPTIONS


@dataclass
class Completion:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    stop_reason: str = ""
    logprobs: list[dict[str, float]] = field(default_factory=list)


@dataclass
class RemoteResult:
    prompt: str
    request_id: str = ""
    completions: dict[int, Completion] = field(default_factory=dict)
    usage: common_pb2.Usage | None = None
    disaggregation: common_pb2.DisaggregationRecord | None = None

    def add(self, response: common_pb2.GenerateResponse) -> None:
        self.request_id = response.request_id
        for delta in response.outputs:
            c = self.completions.setdefault(delta.index, Completion(delta.index))
            c.token_ids += delta.token_ids
            c.text += delta.text
            c.finish_reason = delta.finish_reason or c.finish_reason
            c.stop_reason = delta.stop_reason or c.stop_reason
            c.logprobs += [{str(e.token_id): e.logprob for e in p.entries} for p in delta.logprobs]
        if response.finished:
            self.usage = response.usage
            self.disaggregation = response.disaggregation

    def to_json(self) -> dict:
        first = self.completions.get(0, Completion(0))
        record = {
            "prompt": self.prompt,
            "request_id": self.request_id,
            "token_ids": first.token_ids,
            "text": first.text,
            "finish_reason": first.finish_reason,
            "usage": _flat(self.usage),
            "disaggregation": _flat(self.disaggregation),
        }
        if first.logprobs:
            record["logprobs"] = first.logprobs
        if len(self.completions) > 1:
            record["outputs"] = [
                {"index": c.index, "token_ids": c.token_ids, "text": c.text, "finish_reason": c.finish_reason}
                for c in sorted(self.completions.values(), key=lambda c: c.index)
            ]
        return record


def _flat(msg) -> dict | None:
    """A flat message as a dict with every field, numbers kept as numbers (repeated ones as lists)."""
    if msg is None:
        return None
    return {f.name: list(getattr(msg, f.name)) if f.is_repeated else getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}


def make_request(prompt: str, params: SamplingParams, chat: bool) -> router_pb2.GenerateRequest:
    request = router_pb2.GenerateRequest(sampling=params_to_proto(params))
    if chat:
        request.chat.messages.add(role="user", content=prompt)
    else:
        request.text = prompt
    return request


def router_channel(url: str, tls_ca: bytes | None = None) -> grpc.aio.Channel:
    """A channel to the router: TLS verified against `tls_ca` when given, else plaintext."""
    if tls_ca is None:
        return grpc.aio.insecure_channel(url, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(url, grpc.ssl_channel_credentials(root_certificates=tls_ca), options=CHANNEL_OPTIONS)


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


async def generate_remote(
    url: str, prompts: list[str], params: SamplingParams, chat: bool = False, concurrency: int = 1,
    timeout: float | None = None, api_key: str | None = None, tls_ca: bytes | None = None,
) -> list[RemoteResult]:
    """Send prompts through the router; results in input order. One at a time unless
    `concurrency` > 1."""
    results = [RemoteResult(p) for p in prompts]
    gate = asyncio.Semaphore(max(1, concurrency))
    metadata = auth_metadata(api_key)
    async with router_channel(url, tls_ca) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def one(i: int) -> None:
            async with gate:
                request = make_request(prompts[i], params, chat)
                async for response in stub.Generate(request, timeout=timeout, metadata=metadata):
                    results[i].add(response)

        if concurrency <= 1:
            for i in range(len(prompts)):
                await one(i)
        else:
            await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return results
