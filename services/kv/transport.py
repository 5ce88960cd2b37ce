"""Moving a prompt's KV from a prefill worker to a decode worker.

`KVTransport` is the decode side's view: ask a peer (named by instance id) to prefill a
prompt, receive its blocks as they are computed, then the first sampled tokens. The gRPC
stream is the transport today; same-host transports (CUDA IPC, NCCL) can drop in behind the
same interface. Addresses come from this worker's own configuration (--prefill-peers) or the
fleet registry, never from a request.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import torch

from pdserve.v1 import worker_pb2, worker_pb2_grpc
from services.engine.kv_transfer import BlockData
from services.engine.outputs import SampledToken
from services.kv import wire
from services.rpc.convert import sampled_token
from services.rpc.server import CHANNEL_OPTIONS, request_metadata

log = logging.getLogger("pdserve.kv")


class PeerError(Exception):
    """The named prefill peer is unknown or cannot exchange KV with us."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PrefillDone:
    first_tokens: list[SampledToken]  # one per sequence, in index order
    cached_tokens: int  # prompt tokens the prefill worker found in its own prefix cache


class KVTransport(ABC):
    @abstractmethod
    def pull(
        self, peer_id: str, request: worker_pb2.PrefillRequest, timeout: float | None
    ) -> AsyncIterator[BlockData | PrefillDone]:
        """Blocks as the peer computes them, then one PrefillDone. Raises PeerError,
        wire.KVWireError (a corrupt block) or grpc.aio.AioRpcError."""

    async def close(self) -> None:
        return None


class GrpcKVTransport(KVTransport):
    def __init__(
        self,
        peers: dict[str, str],
        instance_id: str,
        identity: worker_pb2.ModelIdentity,
        block_shape: tuple[int, ...],
        dtype: torch.dtype,
        resolve: Callable[[str], Awaitable[str | None]] | None = None,
    ) -> None:
        """`peers`: static id -> address; `resolve`: the address of any other id (the fleet registry)."""
        self.peers = peers
        self.resolve = resolve
        self.instance_id = instance_id
        self.identity = identity
        self.block_shape = block_shape  # [layers, 2, block_size, kv_heads, head_dim]
        self.dtype = dtype
        self._stubs: dict[str, tuple[str, worker_pb2_grpc.PrefillWorkerStub]] = {}  # id -> (address, stub)
        self._channels: list[grpc.aio.Channel] = []
        self._checked: set[str] = set()
        self._lock = asyncio.Lock()

    async def _address(self, peer_id: str) -> str | None:
        address = self.peers.get(peer_id)
        if address is None and self.resolve is not None:
            address = await self.resolve(peer_id)
        return address

    async def _stub(self, peer_id: str, timeout: float | None) -> worker_pb2_grpc.PrefillWorkerStub:
        async with self._lock:
            address = await self._address(peer_id)
            if address is None:
                raise PeerError(f"unknown prefill instance {peer_id!r}", grpc.StatusCode.INVALID_ARGUMENT)
            if self._stubs.get(peer_id, ("", None))[0] != address:  # new, or restarted elsewhere
                channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
                self._channels.append(channel)
                self._stubs[peer_id] = (address, worker_pb2_grpc.PrefillWorkerStub(channel))
                self._checked.discard(peer_id)
            stub = self._stubs[peer_id][1]
            if peer_id not in self._checked:
                await self._handshake(peer_id, address, stub, timeout)
                self._checked.add(peer_id)
            return stub

    async def _handshake(
        self, peer_id: str, address: str, stub: worker_pb2_grpc.PrefillWorkerStub, timeout: float | None
    ) -> None:
        request = worker_pb2.HandshakeRequest(instance_id=self.instance_id, role="decode", identity=self.identity)
        try:
            await stub.Handshake(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise PeerError(e.details()) from e
            raise
        log.info("handshake with prefill %s (%s) ok", peer_id, address)

    async def pull(self, peer_id, request, timeout):
        stub = await self._stub(peer_id, timeout)
        call = stub.Prefill(request, timeout=timeout, metadata=request_metadata(request.request_id))
        try:
            async for response in call:
                if response.HasField("block"):
                    yield wire.decode(response.block, self.block_shape, self.dtype)
                else:
                    result = response.result
                    tokens = sorted(result.first_tokens, key=lambda t: t.index)
                    yield PrefillDone(
                        [sampled_token(t.token_id, t.logprobs if t.HasField("logprobs") else None) for t in tokens],
                        result.cached_tokens,
                    )
        finally:
            call.cancel()  # no-op when it completed; aborts the prefill when we stop early

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
